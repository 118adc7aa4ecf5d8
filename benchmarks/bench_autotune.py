"""
Time one compiled FlexVAR block at the largest scale over several fresh compilations.

Compiles one block of a released size afresh (a fresh Inductor cache) `--trials` times for each side and batch of
the dynamic-shape graph's first launch (`--first_sides`, `--first_batches`; generation launches it first at the 2x2
scale of its first call's batch, the 1x1 scale having a graph of its own), then times the block at the last scale of
`--batch` (the guidance-doubled batch, the earlier scales' tokens in its cache) and prints the spread. It was written
for runs 9-10's question, whether the first launch (where Inductor times a kernel's candidate configurations) or a
profiler session before compiling (`--after_profiler`) makes some processes' kernels slower; run 11 of RESULTS.md
found neither at a first launch of batch 64 (4% between compilations). Run 25b found three of six compilations about
30% slower after a first launch at batch 1 or at batch 64, timing 20 calls right after compiling; the warm-up by time
(`--warmup_s`) and the longer CUDA-event timing tell slower kernels from clocks still low after the compilation.
`--persistent_rows` compiles under `flexvar_hf.utils.inductor.wide_row_persistent_reductions()`.

    python benchmarks/bench_autotune.py --size d24 --batch 64 --first_sides 2 16 --trials 4 --json autotune.json
    python benchmarks/bench_autotune.py --size d24 --batch 64 --first_sides 2 --trials 2 --persistent_rows
    python benchmarks/bench_autotune.py --size d16 --batch 64 --first_sides 2 --first_batches 1 64 --trials 6
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
from torch._inductor.utils import fresh_inductor_cache

from bench_generate import DEPTHS, DTYPES, build_transformer
from flexvar_hf.models.transformer_flexvar import FlexVARBlock, FlexVARKVCache, ResidualUpdate
from flexvar_hf.utils.inductor import PERSISTENT_ROW_LIMIT, wide_row_persistent_reductions


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="d24", choices=sorted(DEPTHS))
    parser.add_argument("--batch", type=int, default=64, help="Images; the block sees twice as many (guidance).")
    parser.add_argument(
        "--sides",
        nargs="+",
        type=int,
        default=[1, 2, 3, 4, 5, 6, 8, 10, 13, 16],
        help="The scale sides of one generation (256x256, 10 steps by default); the last is timed.",
    )
    parser.add_argument(
        "--first_sides",
        nargs="+",
        type=int,
        default=[2, 16],
        help="Sides of the dynamic graph's first launch to compare.",
    )
    parser.add_argument(
        "--first_batches",
        nargs="+",
        type=int,
        default=None,
        help="Images at the dynamic-shape graph's first launch to compare (default: --batch). Generation compiles "
        "at its first call, often batch 1, whose few rows leave the timing of a kernel's candidate configurations "
        "to noise.",
    )
    parser.add_argument("--trials", type=int, default=4, help="Fresh compilations per first side and batch.")
    parser.add_argument(
        "--after_profiler",
        action="store_true",
        help="Profile a few eager block calls with torch.profiler before compiling, as bench_generate's --profile "
        "did before its compiled modes in runs 6a and 9 (the profiler leaves CUDA's tracing set up).",
    )
    parser.add_argument("--iters", type=int, default=200, help="Timed calls per compilation (CUDA events).")
    parser.add_argument(
        "--warmup_s",
        type=float,
        default=1.0,
        help="Seconds of calls before timing, so that the GPU's clocks recover from the compilation's idle time "
        "(run 25b timed 20 calls right after 3 warm-up calls).",
    )
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--persistent_rows",
        action="store_true",
        help="Compile within `wide_row_persistent_reductions()`: one-pass LayerNorms over rows of up to "
        f"{PERSISTENT_ROW_LIMIT} elements.",
    )
    args = parser.parse_args(argv)
    if any(side not in args.sides[1:] for side in args.first_sides):
        parser.error(f"--first_sides must be among the sides after the first, {args.sides[1:]}.")
    return args


class BlockInputs:
    """Random inputs of one block at every side of a generation, with a one-layer cache."""

    def __init__(self, block: FlexVARBlock, sequences: int, sides: list[int], dtype: torch.dtype):
        dim = block.attn.num_heads * block.attn.head_dim
        tensor_kw = {"dtype": dtype, "device": block.attn.to_qkv.weight.device}
        self.sides = sides
        self.modulation = block.modulation(torch.randn(sequences, dim, **tensor_kw))
        self.hidden = {side: torch.randn(sequences, side * side, dim, **tensor_kw) for side in sides}
        # The previous block's feed-forward update, which every block after the first adds in its first norm.
        gate_ff = self.modulation[5]
        self.updates = {side: ResidualUpdate(gate_ff, torch.randn_like(rows)) for side, rows in self.hidden.items()}
        max_tokens = sum(side * side for side in sides)
        self.cache = FlexVARKVCache(1, sequences, block.attn.num_heads, max_tokens, block.attn.head_dim, **tensor_kw)
        for buffer in self.cache.key_values:
            buffer.normal_()  # the earlier scales' keys and values, never written by `run`

    def run(self, block, side: int) -> torch.Tensor:
        """One call at `side`, with the tokens of the sides before it cached (their values do not matter here)."""
        self.cache.length = sum(earlier * earlier for earlier in self.sides[: self.sides.index(side)])
        return block(self.hidden[side], self.modulation, None, self.cache, 0, self.updates[side])


def time_trial(
    block: FlexVARBlock,
    inputs: BlockInputs,
    first_inputs: BlockInputs,
    first_side: int,
    iters: int,
    warmup_s: float,
    persistent_rows: bool,
) -> float:
    """Compile `block` afresh, launch it on `first_inputs` at side 1 then `first_side`, call it on `inputs` at the
    last side for `warmup_s` seconds, and return ms per call there (mean of `iters`, CUDA events)."""
    torch._dynamo.reset()
    compiled = torch.compile(block, dynamic=True)
    heuristics = wide_row_persistent_reductions() if persistent_rows else contextlib.nullcontext()
    with torch.no_grad(), fresh_inductor_cache():  # a new cache folder, in-memory caches cleared: a new draw
        with heuristics:
            first_inputs.run(compiled, first_inputs.sides[0])
            first_inputs.run(compiled, first_side)
        last = inputs.sides[-1]
        warmup_end = time.perf_counter() + warmup_s
        while time.perf_counter() < warmup_end:
            inputs.run(compiled, last)
            torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            inputs.run(compiled, last)
        end.record()
        end.synchronize()
    return start.elapsed_time(end) / iters


def profile_eager_calls(block: FlexVARBlock, inputs: BlockInputs) -> None:
    """One torch.profiler session over eager calls at every side; afterwards CUDA's tracing stays set up."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]):
        for side in inputs.sides:
            inputs.run(block, side)
        torch.cuda.synchronize()


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("This benchmark needs a CUDA GPU.")
    dtype = DTYPES[args.dtype]
    block = build_transformer(DEPTHS[args.size]).blocks[0].to(device="cuda", dtype=dtype).eval()
    first_batches = args.first_batches or [args.batch]
    with torch.no_grad():
        inputs = {batch: BlockInputs(block, 2 * batch, args.sides, dtype) for batch in {args.batch, *first_batches}}
    if args.after_profiler:
        profile_eager_calls(block, inputs[args.batch])
    recorded_args = {name: value for name, value in vars(args).items() if name != "json"}
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "args": recorded_args}
    for first_batch in first_batches:
        for first_side in args.first_sides:
            times = [
                time_trial(
                    block,
                    inputs[args.batch],
                    inputs[first_batch],
                    first_side,
                    args.iters,
                    args.warmup_s,
                    args.persistent_rows,
                )
                for _ in range(args.trials)
            ]
            results[f"first_batch_{first_batch}_side_{first_side}"] = times
            print(
                f"{args.size} batch {args.batch}, first launch at batch {first_batch}, {first_side}x{first_side}: "
                f"block at {args.sides[-1]}x{args.sides[-1]} {min(times):.3f}-{max(times):.3f} ms (median "
                f"{statistics.median(times):.3f}) over {len(times)} compilations: "
                + ", ".join(f"{t:.3f}" for t in times),
                flush=True,
            )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
