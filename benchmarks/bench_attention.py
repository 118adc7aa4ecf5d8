"""
Time the cached attention of one layer at every scale of a generation: the query/key norm and key/value cache write,
and the attention, each in a few variants, on random tensors of a released size's shapes.

Norm and write (this call's projection into queries and the layer's `(B, max_tokens, 2, H, D)` cache):
- `norm+write fused`: the model's path on CUDA, one Triton kernel (`FlexVARKVCache.update`, `kv_cache_kernel`);
- `norm+write split`: the path before it, `normalize_queries_keys` compiled with `dynamic=True`, then a copy of the
  keys and values from the strided view of its output;
Writes alone (keys and values already normalised):
- `write contiguous`: a copy from a contiguous `(B, l, 2, H, D)` source, the bound for any layout of the source;
- `write compiled`: `index_copy_` into the cache, compiled with `dynamic=True` (one graph for every scale).
Attention: `F.scaled_dot_product_attention` restricted to each backend (cuDNN, flash, memory-efficient).

Prints the milliseconds of one generation per variant: the sum over scales of one call, times the layers.

    python benchmarks/bench_attention.py --size d24 --batch 64 --json attention.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench_generate import DEPTHS, DTYPES
from flexvar_hf.models.transformer_flexvar import FlexVARKVCache, attention, normalize_queries_keys

BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="d24", choices=sorted(DEPTHS))
    parser.add_argument("--batch", type=int, default=64, help="Images; the layer sees twice as many (guidance).")
    parser.add_argument("--sides", nargs="+", type=int, default=[1, 2, 3, 4, 5, 6, 8, 10, 13, 16])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def time_ms(fn, iters: int, warmup: int = 1) -> float:
    """Mean milliseconds of `fn()` on the GPU over `iters` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / iters


@torch.compile(dynamic=True)
def index_copy_write(cache: torch.Tensor, key_values: torch.Tensor, positions: torch.Tensor) -> None:
    cache.index_copy_(1, positions, key_values)


compiled_norm = torch.compile(normalize_queries_keys, dynamic=True)


def split_norm_and_write(qkv: torch.Tensor, temperature: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """The norm and write before the fused kernel: the compiled norm, then a copy from its strided output."""
    normalized = compiled_norm(qkv, temperature).unflatten(2, (3, -1))
    slot.copy_(normalized[:, :, 1:])
    return normalized[:, :, 0]


def time_scale(cache: FlexVARKVCache, length: int, iters: int) -> dict[str, float]:
    """Milliseconds of each norm/write and attention variant for one call of `length` tokens after those cached."""
    sequences, _, _, heads, head_dim = cache.key_values[0].shape
    dtype = cache.key_values[0].dtype
    qkv = torch.randn(sequences, length, 3 * heads, head_dim, dtype=dtype, device="cuda")
    temperature = torch.rand(1, 1, heads, 1, dtype=dtype, device="cuda") + 1
    start, end = cache.length, cache.length + length
    slot = cache.key_values[0][:, start:end]
    key_values = qkv.unflatten(2, (3, heads))[:, :, 1:]
    contiguous = key_values.contiguous()
    positions = torch.arange(start, end, device="cuda")
    times = {
        "norm+write split": time_ms(lambda: split_norm_and_write(qkv, temperature, slot), iters),
        "write contiguous": time_ms(lambda: slot.copy_(contiguous), iters),
        "write compiled": time_ms(lambda: index_copy_write(cache.key_values[0], key_values, positions), iters),
    }
    torch.testing.assert_close(slot, key_values, rtol=0, atol=0)  # the compiled write wrote this call's tokens
    expected_query = split_norm_and_write(qkv, temperature, slot)
    expected_slot = slot.clone()
    times["norm+write fused"] = time_ms(lambda: cache.update(0, qkv, temperature), iters)
    query, keys, values = cache.update(0, qkv, temperature)
    # The fused kernel's numbers are the split path's up to one rounding.
    torch.testing.assert_close(query, expected_query, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(slot, expected_slot, rtol=1e-2, atol=1e-3)
    for name, backend in BACKENDS.items():
        with sdpa_kernel(backend):
            try:
                times[f"attention {name}"] = time_ms(lambda: attention(query, keys, values, None), iters)
            except RuntimeError as error:  # a backend that refuses these shapes
                times[f"attention {name}"] = float("nan")
                print(f"{name} at {length} tokens: {str(error).splitlines()[0]}")
    cache.advance(length)
    return times


def main(argv=None) -> int:
    args = parse_args(argv)
    depth, dtype = DEPTHS[args.size], DTYPES[args.dtype]
    heads, head_dim, sequences = depth, 64, 2 * args.batch  # the released sizes: width 64 * depth, 64 per head
    lengths = [side * side for side in args.sides]
    cache = FlexVARKVCache(1, sequences, heads, sum(lengths), head_dim, dtype=dtype, device="cuda")
    totals: dict[str, float] = {}
    per_scale = []
    for length in lengths:
        times = time_scale(cache, length, args.iters)
        per_scale.append({"tokens": length, **times})
        for name, ms in times.items():
            totals[name] = totals.get(name, 0.0) + ms * depth
    for name, ms in totals.items():
        print(f"{args.size} batch {args.batch}: {name:20s} {ms:8.2f} ms per generation ({depth} layers)")
    if args.json:
        report = {"args": {**vars(args), "json": str(args.json)}, "totals_ms": totals, "per_scale": per_scale}
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
