"""
Speed of VQ-16 decoding alone, under the settings that `pipe.enable_fast_sampling()` can choose between.

Decodes random 16x16 token grids (256x256 images) with a randomly initialised `FlexVQModel` of the released layout
and times each setting as the fast path runs it: captured once as a CUDA graph, then replayed. Settings: eager or
`decoder.compile()`, each with the weights in contiguous (NCHW) or channels-last (NHWC) memory format. (cuDNN's
algorithm search, `torch.backends.cudnn.benchmark`, was measured in run 5 of RESULTS.md: no gain.)

    python benchmarks/bench_decode.py --batches 1 64 --json decode.json
    python benchmarks/bench_decode.py --batches 64 --profile   # and the kernels of the compiled channels-last decoding
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

from flexvar_hf import FlexVQModel


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--tokens", type=int, default=16, help="Token grid side (16: 256x256 images).")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None, help="Write the results here.")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="Also print the CUDA kernels of one compiled channels-last decoding of the last batch (as fast sampling "
        "runs it), by total GPU time.",
    )
    return parser.parse_args(argv)


def replay_ms(fn: Callable[[], object], iters: int) -> float:
    """Mean milliseconds of one replay of `fn()` captured as a CUDA graph (after 3 eager warm-ups on a side stream
    and one replay)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def profile_kernels(decode: Callable[[], object]) -> str:
    """Table of the CUDA kernels of one `decode()` call (after a warm-up), by total GPU time."""
    from torch.profiler import ProfilerActivity, profile

    decode()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decode()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=160)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    results = []
    with torch.inference_mode():
        for compiled in (False, True):
            for channels_last in (False, True):
                torch.manual_seed(0)
                vqvae = FlexVQModel().to("cuda", torch.bfloat16).eval()  # the defaults: the released VQ-16
                if channels_last:  # the decoding modules, as enable_fast_sampling(torch_compile=True) converts them
                    for module in (vqvae.post_quant_conv, vqvae.decoder):
                        module.to(memory_format=torch.channels_last)
                if compiled:
                    vqvae.decoder.compile()

                def decode(indices, vqvae=vqvae):
                    return vqvae.decode_indices(indices, return_dict=False)[0]

                for batch in args.batches:
                    indices = torch.randint(vqvae.config.num_codes, (batch, args.tokens, args.tokens), device="cuda")
                    ms = replay_ms(lambda indices=indices: decode(indices), args.iters)
                    row = {"compiled": compiled, "channels_last": channels_last, "batch": batch, "ms": ms}
                    results.append(row)
                    print(json.dumps(row), flush=True)
                if args.profile and compiled and channels_last:  # last: the profiler stays set up in the process
                    print(profile_kernels(lambda indices=indices: decode(indices)), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
