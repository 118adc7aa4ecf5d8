"""
What FP8 matrix products would give a generation: the transformer's linear layers of one generation in bfloat16
against FP8 (e4m3, one scale per row of activations and per output channel of weights, `torch._scaled_mm`).

For every scale of the schedule and each linear layer of a block (the query/key/value projection, the attention's
output projection, the feed-forward's two projections) plus the output head, the rows that layer sees (twice the
images in a block, for guidance; the images in the head, which runs after guidance is combined) are multiplied by
random weights of the size's shapes. Each variant runs every product of one generation's layer as one captured CUDA
graph (no launch gaps, as in fast sampling), timed with CUDA events and multiplied by the layers. Variants:
- `bf16`: `F.linear`, what the model runs now;
- `fp8`: the FP8 product alone, activations already quantised (the bound for quantisation fused into the kernel
  before it), cuBLAS's fast accumulation;
- `fp8_exact_accum`: the same without fast accumulation;
- `fp8_quantize`: the activations quantised per row by a compiled kernel of their own, then `fp8`: the cost with
  one extra pass over each input.
Then the GELU and quantisation between the feed-forward's two products (of the second product's inputs at every
scale, times the blocks), as `torch.compile` makes it of `float8.gelu_quantize_rows`' PyTorch operations and as
the Triton kernel of `float8_kernel` with 4, 8 (the package's) and 16 warps (its GPU rounding).
Errors are `|out - ref| / |ref|` against a float64 product of the same inputs at the last scale, on random data: a
check of the products' precision, not of a trained model's quality (real activations have outliers).

    python benchmarks/bench_fp8.py --size d24 --batch 64 --json fp8.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_decode import replay_ms
from bench_generate import DEPTHS, VOCAB_SIZE
from flexvar_hf import FlexVARScaleScheduler
from flexvar_hf.models import float8_kernel
from flexvar_hf.models.float8 import FLOAT8_MAX, MIN_SCALE, quantize_rows

VARIANTS = ("bf16", "fp8", "fp8_exact_accum", "fp8_quantize")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="d24", choices=sorted(DEPTHS))
    parser.add_argument("--batch", type=int, default=64, help="Images; the blocks see twice as many rows (guidance).")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--iters", type=int, default=20, help="Graph replays timed per variant.")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


class LinearShapes:
    """One linear layer's random weight and bias, its bfloat16 and FP8 forms, and its inputs at every scale."""

    def __init__(self, in_features: int, out_features: int, rows: list[int], device: str):
        weight = torch.randn(out_features, in_features, device=device) * (1 / (3 * in_features)) ** 0.5
        self.weight, self.bias = weight.bfloat16(), torch.randn(out_features, device=device).bfloat16() * 0.02
        self.weight_fp8, weight_scales = quantize_rows(self.weight)
        self.weight_scales = weight_scales.t()  # (1, N): one per output channel
        self.inputs = [torch.randn(m, in_features, device=device).bfloat16() for m in rows]
        self.quantized = [quantize_rows(x) for x in self.inputs]

    def fp8(self, quantized: tuple[torch.Tensor, torch.Tensor], fast_accum: bool = True) -> torch.Tensor:
        values, scales = quantized
        return torch._scaled_mm(
            values,
            self.weight_fp8.t(),
            scale_a=scales,
            scale_b=self.weight_scales,
            bias=self.bias,
            out_dtype=torch.bfloat16,
            use_fast_accum=fast_accum,
        )

    def run(self, variant: str, quantize: Callable) -> None:
        """Every scale's product once, as `variant` computes it."""
        for x, quantized in zip(self.inputs, self.quantized):
            if variant == "bf16":
                F.linear(x, self.weight, self.bias)
            elif variant == "fp8_quantize":
                self.fp8(quantize(x))
            else:
                self.fp8(quantized, fast_accum=variant == "fp8")

    def errors(self) -> dict[str, float]:
        """Relative error of each form of the last scale's product against float64."""
        x, quantized = self.inputs[-1], self.quantized[-1]
        reference = F.linear(x.double(), self.weight.double(), self.bias.double())
        outputs = {
            "bf16": F.linear(x, self.weight, self.bias),
            "fp8": self.fp8(quantized),
            "fp8_exact_accum": self.fp8(quantized, fast_accum=False),
        }
        return {name: ((out.double() - reference).norm() / reference.norm()).item() for name, out in outputs.items()}


def gelu_quantize_ms(inputs: list[torch.Tensor], iters: int) -> dict[str, float]:
    """Milliseconds of one GELU + quantisation of every input, compiled and as the kernel at several warp counts."""

    def pytorch_ops(values):
        return quantize_rows(F.gelu(values.float(), approximate="tanh"))

    def fused(values, num_warps):
        quantized = torch.empty(values.shape, dtype=torch.float8_e4m3fn, device=values.device)
        scales = torch.empty(values.shape[0], 1, device=values.device)
        float8_kernel.launch_gelu_quantize_rows(values, quantized, scales, MIN_SCALE, FLOAT8_MAX, num_warps=num_warps)

    compiled = torch.compile(pytorch_ops, dynamic=True)
    timings = {"compiled": replay_ms(lambda: [compiled(x) for x in inputs], iters)}
    for num_warps in (4, 8, 16):
        run = lambda num_warps=num_warps: [fused(x, num_warps) for x in inputs]  # noqa: E731
        timings[f"kernel_{num_warps}_warps"] = replay_ms(run, iters)
    timings["kernel_op"] = replay_ms(
        lambda: [float8_kernel.fused_gelu_quantize_rows(x, MIN_SCALE, FLOAT8_MAX) for x in inputs], iters
    )
    return timings


def layer_shapes(depth: int, batch: int, resolution: int, device: str) -> dict[str, LinearShapes]:
    scheduler = FlexVARScaleScheduler()
    scheduler.set_timesteps(None, height=resolution, width=resolution)
    tokens = [h * w for h, w in scheduler.scales]
    width = 64 * depth
    block_rows, head_rows = [2 * batch * t for t in tokens], [batch * t for t in tokens]
    return {
        "qkv": LinearShapes(width, 3 * width, block_rows, device),
        "attn_out": LinearShapes(width, width, block_rows, device),
        "ff_in": LinearShapes(width, 4 * width, block_rows, device),
        "ff_out": LinearShapes(4 * width, width, block_rows, device),
        "head": LinearShapes(width, VOCAB_SIZE, head_rows, device),
    }


@torch.inference_mode()
def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("This benchmark needs a CUDA GPU.")
    depth = DEPTHS[args.size]
    torch.manual_seed(0)
    layers = layer_shapes(depth, args.batch, args.resolution, "cuda")
    quantize = torch.compile(quantize_rows, dynamic=True)
    arguments = {**vars(args), "json": str(args.json)}
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "args": arguments}
    per_generation = {variant: {} for variant in VARIANTS}
    for name, layer in layers.items():
        repeats = 1 if name == "head" else depth
        for variant in VARIANTS:
            ms = replay_ms(lambda layer=layer, variant=variant: layer.run(variant, quantize), args.iters)
            per_generation[variant][name] = ms * repeats
        report.setdefault("errors", {})[name] = layer.errors()
    report["ms_per_generation"] = per_generation
    print(f"{args.size} batch {args.batch}, ms of one generation's linear layers ({depth} blocks + head)")
    print(f"{'layer':10}" + "".join(f"{v:>17}" for v in VARIANTS) + f"{'err bf16':>10}{'err fp8':>10}")
    for name in [*layers, "total"]:
        row = [sum(per_generation[v].values()) if name == "total" else per_generation[v][name] for v in VARIANTS]
        errors = report["errors"].get(name, {})
        error_cells = f"{errors['bf16']:10.1e}{errors['fp8']:10.1e}" if errors else ""
        print(f"{name:10}" + "".join(f"{ms:17.2f}" for ms in row) + error_cells)
    gelu = {name: ms * depth for name, ms in gelu_quantize_ms(layers["ff_out"].inputs, args.iters).items()}
    report["gelu_quantize_ms_per_generation"] = gelu
    print("GELU + quantisation of the second feed-forward product's inputs, ms per generation:")
    print("  " + ", ".join(f"{name} {ms:.2f}" for name, ms in gelu.items()))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
