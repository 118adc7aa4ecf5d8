"""
The optimizer's part of a training step alone: clipping the gradients' norm at 2.0 and one AdamW step (0.9, 0.95,
weight decay 0.05 on train.py's groups) over a FlexVAR transformer's parameters, with fixed random gradients.

- `fused`: what train.py runs with `--fused_adamw` (`clip_and_step(..., fold_clip=True)`: the norm, then PyTorch's
  fused AdamW kernel with the clip factor applied inside it);
- `compiled`: the norm, the clip and a multi-tensor AdamW step compiled together by Inductor (`torch.compile` of
  the whole function; the learning rate a tensor, so that a changing rate does not recompile);
- `bf16weights`: the linear layers' weights in bfloat16 with float32 masters in the optimizer
  (`build_optimizer(..., bf16_weights=True)`: `MasterWeightAdamW`, its update compiled on a GPU), bfloat16
  gradients, the norm in float32 and the clip folded into the update. What it saves in the model's forward and
  backward passes (autocast's casts of the weights and their gradients) shows in `bench_train.py`'s `bf16weights`.

Prints ms per step (the median of `--iters` steps after `--warmup`, timed with CUDA events on a GPU), the bytes a
step must move at the least (28 per parameter for AdamW's reads and writes, float32 but for bfloat16 gradients and
weight copies, and the gradients' size again for their norm) and the rate that gives, the first step's seconds, and
how far each method's float32 weights are from the first method's after the same steps. The gradients are drawn
once as bfloat16 values, so that every method steps from the same ones.

    python benchmarks/bench_optimizer.py --size d24 --json optimizer.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench_train import (
    BETAS,
    LEARNING_RATE,
    MAX_GRAD_NORM,
    WEIGHT_DECAY,
    model_size,
    random_transformer,
    synchronize,
)
from flexvar_hf.training.optim import build_optimizer, clip_and_step

METHODS = ("fused", "compiled", "bf16weights")
# AdamW: parameter (or master), gradient and two moments read, three written (and a bfloat16 copy of a master) is
# 28 bytes a parameter with float32 gradients and with bfloat16 gradients and copies; the norm reads the gradients.
ADAMW_BYTES = 28


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="d24", help="d16, d20, d24 or d30 (the released widths), or tiny.")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", default=None, help="Write the results here.")
    return parser.parse_args(argv)


def fixed_gradients(model: torch.nn.Module) -> list[torch.Tensor]:
    """One float32 gradient per parameter, drawn once as bfloat16 values: large enough that the clipping at 2.0
    acts."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(1)
    return [
        (torch.randn(param.shape, generator=generator, device=param.device) * 1e-2).bfloat16().float()
        for param in model.parameters()
    ]


def folded_clip_step(model: torch.nn.Module, **optimizer_options):
    optimizer = build_optimizer(model, LEARNING_RATE, weight_decay=WEIGHT_DECAY, betas=BETAS, **optimizer_options)
    parameters = list(model.parameters())

    def step():
        return clip_and_step(optimizer, parameters, MAX_GRAD_NORM, fold_clip=True)

    return step, optimizer


def compiled_step(model: torch.nn.Module):
    optimizer = build_optimizer(model, LEARNING_RATE, weight_decay=WEIGHT_DECAY, betas=BETAS, fused=False)
    for group in optimizer.param_groups:
        group["foreach"] = True
        if group["params"][0].is_cuda:  # a tensor rate on the GPU: a scheduler's new value does not recompile
            group["lr"] = torch.tensor(group["lr"], device=group["params"][0].device)
            group["capturable"] = True
    parameters = list(model.parameters())

    @torch.compile(dynamic=False)
    def clip_and_adamw():
        norm = torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM, foreach=True)
        optimizer.step()
        return norm

    def step():
        norm = clip_and_adamw()
        optimizer.zero_grad(set_to_none=True)
        return norm

    return step, optimizer


STEPS = {
    "fused": lambda model: folded_clip_step(model, fused=True),
    "compiled": compiled_step,
    "bf16weights": lambda model: folded_clip_step(model, bf16_weights=True),
}


def run(method: str, size: str, device: torch.device, warmup: int, iters: int) -> tuple[dict, list[torch.Tensor]]:
    model = random_transformer(*model_size(size, tiny=size == "tiny"), device)
    gradients = fixed_gradients(model)
    parameters = list(model.parameters())
    step, optimizer = STEPS[method](model)
    gradients = [grad.to(param.dtype) for param, grad in zip(parameters, gradients)]
    times = []
    for index in range(warmup + iters):
        for param, grad in zip(parameters, gradients):
            param.grad = grad
        synchronize(device)
        start = time.perf_counter()
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            step()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            step()
            times.append((time.perf_counter() - start) * 1e3)
        if index == 0:
            first_step_s = time.perf_counter() - start
    count = sum(param.numel() for param in parameters)
    moved = sum(param.numel() * (ADAMW_BYTES + grad.element_size()) for param, grad in zip(parameters, gradients))
    ms = statistics.median(times[warmup:])
    result = {
        "method": method, "size": size, "parameters_m": count / 1e6, "ms_per_step": ms, "first_step_s": first_step_s,
        "gb_per_step": moved / 1e9, "tb_per_s": moved / ms / 1e9,
    }
    float32_weights = [optimizer.state[param].get("master", param) for param in parameters]
    return result, [weight.detach().clone() for weight in float32_weights]


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    results, reference = [], None
    for method in args.methods:
        result, parameters = run(method, args.size, device, args.warmup, args.iters)
        if reference is None:
            reference = parameters
        result["max_relative_difference"] = max(
            ((mine - first).abs().max() / first.abs().max().clamp(min=1e-12)).item()
            for mine, first in zip(parameters, reference)
        )
        results.append(result)
        print(json.dumps(result), flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=1)
    return results


if __name__ == "__main__":
    main()
