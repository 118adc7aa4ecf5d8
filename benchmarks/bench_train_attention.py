"""
Time the block-causal attention of teacher-forced training alone, forward + backward, in candidate forms, on random
(B, H, L, D) tensors of a released size's shapes and the original's random schedules.

Variants (each checked against the masked `sdpa` output first; the maximum difference is printed):
- `sdpa`, `flex`, `per_scale`: the library's `TRAINING_ATTENTION_BACKENDS` (`block_causal_attention`), `flex` with
  the library's kernel settings for this GPU and head size (`FLEX_KERNEL_OPTIONS`); `flex inductor defaults`
  without them.
- `sdpa cudnn`: the masked call restricted to cuDNN's kernel (fails where cuDNN does not take the mask);
  `sdpa no cudnn`: the masked call with every kernel but cuDNN's (`PER_SCALE_SDPA_BACKENDS`, as `per_scale` runs).
- `flex autotuned`: FlexAttention compiled with `mode="max-autotune-no-cudagraphs"` for each schedule; Inductor's
  autotuning log (stderr) names the kernel settings it picked, to be set as `kernel_options` if they win.
- `flex 64`: the block mask at 64 x 64 blocks (fewer pairs computed, more blocks), with 64-row kernels.
- `flex static`: FlexAttention compiled for each schedule's length (`dynamic=False`) instead of once for all lengths.
- `flex padded`: queries, keys and values padded to whole 128-token blocks (the padding masked), so the kernel is
  built with `IS_DIVISIBLE` (no bounds checks on its loads); `flex padded static` the same compiled per length;
  `flex padded autotuned` the same in max-autotune mode (`--autotune`).
- `sdpa cudnn padded`: the masked cuDNN call on the same padded length (L % 128 == 0).
- `flex + dense last N`: each of the last N scales' queries over the keys up to its end as one unmasked SDPA call
  (no mask: most of the visible pairs are there), the scales before them padded FlexAttention; `flex + flash last
  N` the same with SDPA restricted to the flash kernel (no cuDNN).
- `grouped N`: one SDPA call per group of consecutive scales of at least N query tokens (a mask only inside a group
  of several scales), so the large final scales run the unmasked flash kernel and the small ones share a call.
- `varlen`: one variable-length flash call (`torch.nn.attention.varlen.varlen_attn`) over a sequence per image and
  scale: the scale's queries over a copy of its image's keys and values up to the scale's end (gathered, so about
  sum(scale ends) / L times the keys), so every computed pair is a visible one and no mask is applied.
- `dense flash`: unmasked attention over all L keys: not block-causal, a floor for the time.
- `flex {options}`: `flex` with the `kernel_options` of each `--flex_options` JSON object (forward `BLOCK_M`,
  `BLOCK_N`, `num_warps`, `num_stages`; backward `BLOCK_M1`, `BLOCK_N1`, `BLOCK_M2`, `BLOCK_N2`, ...), to time
  other kernel settings than Inductor's defaults for this GPU.

Prints the milliseconds of one layer's attention per variant (forward + backward; `--forward_only`: the forward alone,
without gradients), summed over the schedules.

    python benchmarks/bench_train_attention.py --size d24 --batch 24 --json attention.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from bench_attention import time_ms
from bench_generate import DEPTHS
from bench_train import model_size, reported
from flexvar_hf import FlexVARScaleScheduler
from flexvar_hf.models.block_causal import (
    FLEX_BLOCK_SIZE,
    PER_SCALE_SDPA_BACKENDS,
    TRAINING_ATTENTION_BACKENDS,
    block_causal_attention,
    block_causal_mask,
    flex_block_mask,
    training_attention_mask,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="d24", choices=sorted(DEPTHS))
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--schedules", type=int, default=4, help="Random schedules of the original's distribution.")
    parser.add_argument("--groups", nargs="*", type=int, default=[64, 128], help="Query tokens per group.")
    parser.add_argument("--autotune", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--forward_only", action="store_true",
                        help="Time the forward alone (without gradients), to split a variant's time into its passes.")
    parser.add_argument("--only", nargs="*", default=None,
                        help="Time only the variants of these names (and those of --flex_options).")
    parser.add_argument("--flex_options", nargs="*", type=json.loads, default=[],
                        help='FlexAttention kernel_options to time, each a JSON object: \'{"BLOCK_M1": 64}\'.')
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def scale_groups(scales: list[tuple[int, int]], min_tokens: int) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """(start, end, scales) of consecutive scales gathered until a group holds at least `min_tokens` queries."""
    groups, start, members = [], 0, []
    for scale in scales:
        members.append(scale)
        end = start + sum(h * w for h, w in members)
        if end - start >= min_tokens:
            groups.append((start, end, members))
            start, members = end, []
    if members:
        groups.append((start, start + sum(h * w for h, w in members), members))
    return groups


def grouped_attention(query, key, value, groups, masks):
    """Each group's queries over the keys up to its end; a mask only inside a group of several scales."""
    outputs = []
    for (start, end, _), mask in zip(groups, masks):
        outputs.append(F.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, :end], value[:, :, :end], attn_mask=mask, scale=1.0))
    return torch.cat(outputs, dim=2)


def group_masks(groups, device):
    """Per group, its (queries, end) mask with the earlier scales as a fully visible prefix (None for one scale)."""
    return [block_causal_mask(members, start, device) for start, _, members in groups]


def varlen_layout(scales, batch: int, device):
    """(cumulative query rows, cumulative key rows, key row index, longest scale, L) of the `varlen` variant."""
    sizes = [h * w for h, w in scales]
    ends = list(itertools.accumulate(sizes))
    length = ends[-1]
    prefix = torch.cat([torch.arange(end) for end in ends])
    key_index = (torch.arange(batch)[:, None] * length + prefix[None]).flatten()
    query_starts = [image * length + end - size for image in range(batch) for end, size in zip(ends, sizes)]
    key_lengths = torch.tensor(ends * batch)
    cu_query = torch.tensor(query_starts + [batch * length], dtype=torch.int32)
    cu_key = torch.cat((torch.zeros(1, dtype=torch.long), key_lengths.cumsum(0))).to(torch.int32)
    return cu_query.to(device), cu_key.to(device), key_index.to(device), max(sizes), length


def varlen_attention(query, key, value, layout):
    from torch.nn.attention.varlen import varlen_attn

    cu_query, cu_key, key_index, max_query, max_key = layout
    batch, heads, length, dim = query.shape

    def rows(tensor):
        return tensor.transpose(1, 2).reshape(batch * length, heads, dim)

    out = varlen_attn(rows(query), rows(key)[key_index], rows(value)[key_index], cu_query, cu_key, max_query,
                      max_key, scale=1.0)
    return out.view(batch, length, heads, dim).transpose(1, 2)


def padded_attention(function, length: int):
    """`function` on inputs padded along L to whole `FLEX_BLOCK_SIZE` blocks, its output cut back to `length`."""
    padding = -length % FLEX_BLOCK_SIZE

    def call(q, k, v):
        return function(*(F.pad(t, (0, 0, 0, padding)) for t in (q, k, v)))[:, :, :length]

    return call


def padded_block_mask(scales, device):
    """`flex_block_mask(scales)` for the padded length (its padding rules already cover the padded tokens)."""
    mask = flex_block_mask(scales, device)
    length = mask.kv_num_blocks.shape[-1] * FLEX_BLOCK_SIZE
    return BlockMask.from_kv_blocks(
        mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices,
        BLOCK_SIZE=FLEX_BLOCK_SIZE, mask_mod=mask.mask_mod, seq_lengths=(length, length))


ALL_SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                     SDPBackend.MATH]


def split_attention(scales, last: int, device, backends=None):
    """`flex + dense last N`: padded FlexAttention over the scales before the last `last`, then one unmasked call
    per remaining scale (its queries over the keys up to its end, SDPA limited to `backends` if given); outputs
    concatenated along L."""
    ends = list(itertools.accumulate(h * w for h, w in scales))
    head = scales[:-last]
    head_length = ends[len(head) - 1]
    head_mask = padded_block_mask(head, device)
    compiled = torch.compile(flex_attention, dynamic=True)
    head_attention = padded_attention(
        lambda q, k, v: compiled(q, k, v, block_mask=head_mask, scale=1.0, kernel_options={"IS_DIVISIBLE": True}),
        head_length,
    )

    def call(q, k, v):
        outputs = [head_attention(*(t[:, :, :head_length] for t in (q, k, v)))]
        with sdpa_kernel(backends or ALL_SDPA_BACKENDS):
            for start, end in zip(ends[len(head) - 1:-1], ends[len(head):]):
                outputs.append(
                    F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end], scale=1.0))
        return torch.cat(outputs, dim=2)

    return call


def library_attention(mask):
    return lambda q, k, v: block_causal_attention(q, k, v, mask)


def variants(scales, args, device, head_dim: int):
    """name -> a function (q, k, v) -> output, for this schedule."""
    found = {name: library_attention(training_attention_mask(scales, name, device, head_dim))
             for name in TRAINING_ATTENTION_BACKENDS}
    mask = block_causal_mask(scales, 0, device)

    def masked(backends):
        def call(q, k, v):
            with sdpa_kernel(backends, set_priority=True):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)

        return call

    found["sdpa cudnn"] = masked([SDPBackend.CUDNN_ATTENTION])
    found["sdpa no cudnn"] = masked(list(PER_SCALE_SDPA_BACKENDS))
    small_mask = flex_block_mask(scales, device, block_size=64)
    compiled = torch.compile(flex_attention, dynamic=True)
    options = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32}
    found["flex 64"] = lambda q, k, v: compiled(q, k, v, block_mask=small_mask, scale=1.0, kernel_options=options)
    length = sum(h * w for h, w in scales)
    block_mask, padded_mask = flex_block_mask(scales, device), padded_block_mask(scales, device)
    static = torch.compile(flex_attention, dynamic=False)
    found["flex static"] = lambda q, k, v: static(q, k, v, block_mask=block_mask, scale=1.0)
    found["flex inductor defaults"] = lambda q, k, v: compiled(q, k, v, block_mask=block_mask, scale=1.0)
    divisible = {"IS_DIVISIBLE": True}
    found["flex padded"] = padded_attention(
        lambda q, k, v: compiled(q, k, v, block_mask=padded_mask, scale=1.0, kernel_options=divisible), length)
    found["flex padded static"] = padded_attention(
        lambda q, k, v: static(q, k, v, block_mask=padded_mask, scale=1.0), length)
    padded_dense_mask = F.pad(block_causal_mask(scales, 0, device), (0, -length % FLEX_BLOCK_SIZE) * 2)
    padded_dense_mask.diagonal().fill_(True)  # padded queries see themselves (no empty rows)

    def cudnn_padded(q, k, v):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=padded_dense_mask, scale=1.0)

    found["sdpa cudnn padded"] = padded_attention(cudnn_padded, length)
    if args.autotune:
        tuned = torch.compile(flex_attention, mode="max-autotune-no-cudagraphs", dynamic=False)
        found["flex autotuned"] = lambda q, k, v: tuned(q, k, v, block_mask=block_mask, scale=1.0)
        found["flex padded autotuned"] = padded_attention(
            lambda q, k, v: tuned(q, k, v, block_mask=padded_mask, scale=1.0), length)
    for size in args.groups:
        groups = scale_groups(scales, size)
        masks = group_masks(groups, device)
        found[f"grouped {size}"] = lambda q, k, v, g=groups, m=masks: grouped_attention(q, k, v, g, m)
    layout = varlen_layout(scales, args.batch, device)
    found["varlen"] = lambda q, k, v: varlen_attention(q, k, v, layout)
    found["dense flash"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=1.0)
    for last in (1, 2):
        found[f"flex + dense last {last}"] = split_attention(scales, last, device)
        found[f"flex + flash last {last}"] = split_attention(scales, last, device, [SDPBackend.FLASH_ATTENTION])
    if args.only is not None:
        found = {name: function for name, function in found.items() if name in args.only}
    for options in args.flex_options:  # timed whatever --only says
        found[f"flex {json.dumps(options, separators=(',', ':'))}"] = (
            lambda q, k, v, o=options: compiled(q, k, v, block_mask=block_mask, scale=1.0, kernel_options=o))
    return found


def time_call(function, q, k, v, grad, iters: int, forward_only: bool = False) -> float:
    """Mean milliseconds of `function`'s forward and backward (`forward_only`: its forward without gradients) after
    3 warm-up calls."""
    def call():
        q.grad = k.grad = v.grad = None
        function(q, k, v).backward(grad)

    if forward_only:
        with torch.no_grad():
            return time_ms(lambda: function(q, k, v), iters, warmup=3)
    return time_ms(call, iters, warmup=3)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda")
    # Every variant compiles `flex_attention` per schedule and mode: past Dynamo's default limit of 8 entries per
    # code object the calls would silently run eagerly (the scores materialised).
    torch._dynamo.config.recompile_limit = 64
    _, width, heads = model_size(args.size, False)
    generator = torch.Generator().manual_seed(0)
    scheduler = FlexVARScaleScheduler()
    schedules = [scheduler.sample_training_scales(256, 256, generator, keep_final_scale=False)
                 for _ in range(args.schedules)]
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "size": args.size,
               "batch": args.batch, "forward_only": args.forward_only,
               "schedules": [[h for h, _ in s] for s in schedules], "ms": {}, "max_diff": {}}
    for scales in schedules:
        length = sum(h * w for h, w in scales)
        q, k, v = (torch.randn(args.batch, heads, length, width // heads, device=device, dtype=torch.bfloat16)
                   .mul_(0.3).requires_grad_() for _ in range(3))
        grad = torch.randn_like(q)
        with torch.no_grad():
            expected = block_causal_attention(q, k, v, block_causal_mask(scales, 0, device))
        for name, function in variants(scales, args, device, width // heads).items():
            with reported(f"{name} L{length}", results):
                with torch.no_grad():
                    difference = (function(q, k, v) - expected).abs().max().item()
                results["max_diff"][name] = max(results["max_diff"].get(name, 0.0), difference)
                results["ms"][name] = results["ms"].get(name, 0.0) + time_call(
                    function, q, k, v, grad, args.iters, args.forward_only)
        print(json.dumps({"L": length, "ms_so_far": results["ms"]}), flush=True)
    passes = "forward" if args.forward_only else "fwd+bwd"
    print(f"\n{args.size} batch {args.batch}, {len(schedules)} schedules, one layer {passes}:")
    for name, ms in sorted(results["ms"].items(), key=lambda item: item[1]):
        print(f"  {name:16} {ms:8.2f} ms  (max diff vs masked sdpa {results['max_diff'][name]:.2e})")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
