"""
Host time of the transformer's block calls in training: a narrow model (width 32, batch 1, a few tokens), where the
kernels take next to nothing, so a teacher-forcing forward + backward costs what the host spends on it. Three ways
to run the blocks:

- `eager`: no compilation;
- `regional`: each block compiled (`compile_repeated_blocks(dynamic=True)`, what `--torch_compile` does): one
  compiled call per layer, each with its guards and wrappers;
- `stack`: every block in one graph (`torch.compile(model.run_blocks, dynamic=True)`): one compiled call per step.

Prints ms per forward + backward (the best of `--repeats` timings of `--iters` rounds over `SCHEDULES`) and the
first passes' seconds (compilation). On a GPU the narrow model's kernels are a few microseconds each, so the figure
is the host's; on a CPU it includes the (small) CPU compute.

    python benchmarks/bench_block_calls.py --layers 16 --device cpu --threads 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench_train import synchronize
from flexvar_hf import FlexVARTransformer2DModel

MODES = ("eager", "regional", "stack")
SCHEDULES = ([1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 4, 5, 6], [1, 2, 3, 4, 6])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--iters", type=int, default=50, help="Rounds over the schedules per timing.")
    parser.add_argument("--repeats", type=int, default=3, help="Timings; the best is reported.")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's).")
    return parser.parse_args(argv)


def build(mode: str, layers: int, device: torch.device) -> FlexVARTransformer2DModel:
    torch.manual_seed(0)
    model = FlexVARTransformer2DModel(
        num_layers=layers, hidden_size=32, num_attention_heads=2, num_classes=10, vocab_size=16, code_dim=8
    ).to(device)
    model.train()
    model.set_training_attention("sdpa")
    torch._dynamo.reset()
    if mode == "regional":
        model.compile_repeated_blocks(dynamic=True)
    elif mode == "stack":
        model.run_blocks = torch.compile(model.run_blocks, dynamic=True)
    return model


def forward_backward(model, sides: list[int], device: torch.device) -> None:
    scales = [(side, side) for side in sides]
    inputs = torch.randn(1, sum(side * side for side in sides) - 1, 8, device=device)
    model(torch.tensor([1], device=device), scales, inputs).logits.sum().backward()


def time_mode(mode: str, args, device: torch.device) -> dict:
    model = build(mode, args.layers, device)
    start = time.perf_counter()
    for sides in SCHEDULES:
        forward_backward(model, sides, device)
    synchronize(device)
    first_s = time.perf_counter() - start
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.iters):
            for sides in SCHEDULES:
                forward_backward(model, sides, device)
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / (args.iters * len(SCHEDULES)))
    return {"mode": mode, "layers": args.layers, "ms_per_forward_backward": best * 1e3, "first_passes_s": first_s}


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = []
    for mode in args.modes:
        results.append(time_mode(mode, args, device))
        print(json.dumps(results[-1]), flush=True)
    return results


if __name__ == "__main__":
    main()
