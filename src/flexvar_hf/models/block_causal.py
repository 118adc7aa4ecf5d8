"""Block-causal attention of teacher-forced training: each token attends to the tokens of its own and all coarser
scales, never to finer ones.

Three ways to compute the same function (`FlexVARTransformer2DModel.set_training_attention`):

- "sdpa": one `F.scaled_dot_product_attention` call with an (L, L) additive bias (`training_score_bias`: the
  block-causal mask, with every visible score shifted by `SDPA_SCORE_SHIFT` so that cuDNN's masked backward stays
  finite). With a mask PyTorch's flash kernel cannot run, and every masked block is still computed.
- "flex": PyTorch's FlexAttention with a `BlockMask` (`flex_block_mask`) built from the scales: blocks of 128 x 128
  query/key pairs that are all masked are skipped, blocks that are all visible run without the mask function. On
  CUDA the call is compiled (dynamic shapes, so one kernel serves every scale schedule); on the CPU it runs eagerly
  (materialising the scores: for tests, not speed). Where `FLEX_KERNEL_OPTIONS` names other kernel settings for the
  GPU and head size than Inductor's defaults, the mask carries them (`FlexMask`).
- "per_scale": one unmasked attention call per scale, its queries over the keys of the scales up to it (a prefix of
  the sequence), so the flash kernel can run; about twice as many calls as scales per layer. The calls never take
  cuDNN's kernel (`PER_SCALE_SDPA_BACKENDS`): on an H100 with torch 2.11, where SDPA prefers cuDNN, these strided
  prefix views gave NaN gradients in eager steps and an illegal memory access in compiled ones.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple, Union

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..utils.transfer import to_device
from ..utils.validation import check_choice

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # torch without FlexAttention
    BlockMask = flex_attention = None

__all__ = [
    "FLEX_BLOCK_SIZE",
    "PER_SCALE_SDPA_BACKENDS",
    "AttentionMask",
    "FLEX_KERNEL_OPTIONS",
    "FlexMask",
    "TRAINING_ATTENTION_BACKENDS",
    "check_training_attention",
    "ScaleBounds",
    "attention_dtype",
    "block_causal_attention",
    "block_causal_mask",
    "flex_block_mask",
    "flex_kernel_options",
    "scale_ids",
    "training_attention_mask",
    "training_score_bias",
]

TRAINING_ATTENTION_BACKENDS = ("sdpa", "flex", "per_scale")
FLEX_BLOCK_SIZE = 128
# The kernels "per_scale" lets SDPA choose from, in order: every one but cuDNN's (see the module's docstring).
PER_SCALE_SDPA_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


# FlexAttention kernel settings that replace Inductor's defaults, by (CUDA compute capability, head size), where a
# benchmark found them faster (benchmarks/bench_train_attention.py --flex_options; benchmarks/RESULTS.md). Hopper
# with 64-wide heads (every released size): forward tiles of 64 queries x 128 keys instead of 128 x 128.
FLEX_KERNEL_OPTIONS: dict[tuple[tuple[int, int], int], dict[str, int]] = {
    ((9, 0), 64): {"BLOCK_M": 64, "BLOCK_N": 128},
}

# Added by the "sdpa" training mask to every visible (query, key) score (`training_score_bias`). A softmax does not
# change when every score of a row moves by one constant, so outputs and gradients are those of the boolean mask up to
# float rounding; what moves is each row's logsumexp, which then stays above 0. cuDNN's masked backward (torch >= 2.11
# on Hopper, the kernel SDPA prefers there) scores the padding of the last 128-key tile as 0 instead of -inf and
# computes exp(0 - logsumexp), which overflows, and gives NaN query gradients, when a row's logsumexp is below -88.7
# and the length is 64 more than a multiple of 128 (pytorch/pytorch issue 196678). FlexVAR's scores lie within about
# +-100 (queries of norm at most 100, unit keys), so its first token, which sees only itself, can get there; shifted
# by 128 every score is above 27.
SDPA_SCORE_SHIFT = 128.0


class FlexMask(NamedTuple):
    """A FlexAttention block mask and the `kernel_options` its call runs with (empty: Inductor's defaults)."""

    block_mask: BlockMask
    kernel_options: dict[str, int]


class ScaleBounds(NamedTuple):
    """Token offsets where each scale of the sequence ends (cumulative token counts), for "per_scale" attention."""

    ends: tuple[int, ...]


# What the attention functions accept as a mask: a boolean tensor or a float bias, a FlexAttention block mask (bare
# or with kernel settings), scale bounds or None.
AttentionMask = Union[torch.Tensor, "BlockMask", FlexMask, ScaleBounds, None]


def scale_ids(scales: Sequence[tuple[int, int]], device: torch.device | str | None = None) -> torch.Tensor:
    """(L,) int64: the index of the scale of every token, row-major per scale."""
    return torch.cat([torch.full((h * w,), i, device=device) for i, (h, w) in enumerate(scales)])


def block_causal_mask(scales: Sequence[tuple[int, int]], num_cached: int, device: torch.device) -> torch.Tensor | None:
    """Boolean (l_new, num_cached + l_new) mask: a token sees every cached token and the tokens of its own and
    earlier scales. None when a single scale is fed (no masking needed)."""
    if len(scales) == 1:
        return None
    ids = scale_ids(scales, device)
    new = ids[:, None] >= ids[None, :]
    cached = torch.ones(len(ids), num_cached, dtype=torch.bool, device=device)
    return torch.cat((cached, new), dim=1)


def flex_block_mask(
    scales: Sequence[tuple[int, int]], device: torch.device | str, block_size: int = FLEX_BLOCK_SIZE
) -> BlockMask:
    """The block-causal mask of `scales` as a FlexAttention `BlockMask`, built from the scale structure (no pass
    over the L x L pairs).

    Scale indices are non-decreasing along the sequence, so a block of queries `q` and keys `k` holds a visible pair
    iff `max id(q) >= min id(k)`, and only visible pairs iff `min id(q) >= max id(k)` ("full" blocks: the mask
    function is skipped). The sequence is padded to whole blocks, queries with the index -1 (they see nothing) and
    keys with one above every real index (nothing sees them), so that a block holding padding is never "full", as in
    `create_block_mask`.
    """
    if BlockMask is None:
        raise ImportError("FlexAttention needs torch >= 2.5 (torch.nn.attention.flex_attention).")
    ids = scale_ids(scales)
    length = len(ids)
    padding = -length % block_size
    query_ids = torch.cat((ids, ids.new_full((padding,), -1)))
    key_ids = torch.cat((ids, ids.new_full((padding,), len(scales))))
    query_blocks, key_blocks = query_ids.view(-1, block_size), key_ids.view(-1, block_size)
    visible = query_blocks.amax(1)[:, None] >= key_blocks[:, 0][None, :]  # (query block, key block)
    full = query_blocks.amin(1)[:, None] >= key_blocks[:, -1][None, :]
    partial = visible & ~full

    def ordered(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = selected.sum(dim=1, dtype=torch.int32)
        # Selected key blocks first, in increasing order (a stable sort of the negated selection).
        indices = torch.sort((~selected).to(torch.int8), dim=1, stable=True).indices.to(torch.int32)
        return to_device(counts[None, None], device), to_device(indices[None, None], device)

    query_ids, key_ids = to_device(query_ids, device), to_device(key_ids, device)

    def mask_mod(batch, head, query_index, key_index):
        return query_ids[query_index] >= key_ids[key_index]

    kv_num_blocks, kv_indices = ordered(partial)
    full_kv_num_blocks, full_kv_indices = ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, BLOCK_SIZE=block_size, mask_mod=mask_mod,
        seq_lengths=(length, length),
    )


def training_score_bias(
    scales: Sequence[tuple[int, int]], device: torch.device | str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The "sdpa" training mask: an (L, L) bias of `dtype` added to the scores, `SDPA_SCORE_SHIFT` where
    `block_causal_mask` lets a token attend and -inf elsewhere (both exact in every float dtype).
    `block_causal_attention` casts it to `attention_dtype`, a kernel in every layer unless it is of that dtype.
    Built in two kernels from scale indices made on the CPU (one copy, not a kernel per scale): a training step's
    host time is part of its time when the GPU waits for it."""
    ids = to_device(scale_ids(scales), device)
    return torch.where(ids[:, None] >= ids[None, :], SDPA_SCORE_SHIFT, float("-inf")).to(dtype)


def attention_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype scaled-dot-product attention runs in for `query`: autocast's where autocast is on for its device
    (which casts the inputs, a bias included), else the query's."""
    device_type = query.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else query.dtype


def check_training_attention(backend: str) -> str:
    """`backend` if it names one of `TRAINING_ATTENTION_BACKENDS`, else a ValueError listing them."""
    return check_choice("training_attention", backend, TRAINING_ATTENTION_BACKENDS)


def flex_kernel_options(device: torch.device | str, head_dim: int | None) -> dict[str, int]:
    """The `FLEX_KERNEL_OPTIONS` entry for `device`'s GPU and `head_dim`; empty (Inductor's defaults) off CUDA, for
    other GPUs and head sizes, or with `head_dim` None."""
    device = torch.device(device)
    if device.type != "cuda" or head_dim is None:
        return {}
    return dict(FLEX_KERNEL_OPTIONS.get((torch.cuda.get_device_capability(device), head_dim), {}))


def training_attention_mask(
    scales: Sequence[tuple[int, int]],
    backend: str,
    device: torch.device,
    head_dim: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> AttentionMask:
    """What `block_causal_attention` needs for `backend` (see `TRAINING_ATTENTION_BACKENDS`) to attend block-causally
    over `scales` fed together without a cache; None for a single scale. `head_dim` (the attention's head size)
    selects FlexAttention's kernel settings (`flex_kernel_options`); `dtype` is the attention's (the "sdpa" bias is
    built in it)."""
    check_training_attention(backend)
    if len(scales) == 1:
        return None
    if backend == "flex":
        return FlexMask(flex_block_mask(scales, device), flex_kernel_options(device, head_dim))
    if backend == "per_scale":
        ends, total = [], 0
        for height, width in scales:
            total += height * width
            ends.append(total)
        return ScaleBounds(tuple(ends))
    return training_score_bias(scales, device, dtype)


@functools.cache
def _compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=True)


def _flex_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: FlexMask) -> torch.Tensor:
    """FlexAttention over (B, H, L, D) inputs with unscaled dot products: compiled on CUDA outside compiled regions
    (inside one, the region's compiler takes the call), eager elsewhere."""
    run = flex_attention
    if query.is_cuda and not torch.compiler.is_compiling():
        run = _compiled_flex_attention()
    return run(query, key, value, block_mask=mask.block_mask, scale=1.0, kernel_options=mask.kernel_options or None)


@torch.compiler.disable
def _per_scale_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: ScaleBounds):
    """Each scale's (B, H, l, D) queries over the keys and values of the scales up to it; outputs concatenated.
    Kept out of compiled graphs: the Python loop over the scales would be specialised on every schedule."""
    outputs, start = [], 0
    with sdpa_kernel(list(PER_SCALE_SDPA_BACKENDS), set_priority=True):
        for end in bounds.ends:
            outputs.append(
                F.scaled_dot_product_attention(query[:, :, start:end], key[:, :, :end], value[:, :, :end], scale=1.0)
            )
            start = end
    return torch.cat(outputs, dim=2)


def block_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: AttentionMask,
) -> torch.Tensor:
    """Attention of (B, H, l, D) queries over (B, H, L, D) keys and values -> (B, H, l, D), with unscaled dot
    products (the queries carry the head temperatures). `attention_mask` from `training_attention_mask` or
    `block_causal_mask` picks the computation: a `FlexMask` or `BlockMask` runs FlexAttention, `ScaleBounds` one call
    per scale, a boolean tensor (True where a token may attend), a float bias added to the scores
    (`training_score_bias`) or None scaled-dot-product attention."""
    if BlockMask is not None and isinstance(attention_mask, BlockMask):
        attention_mask = FlexMask(attention_mask, {})
    if isinstance(attention_mask, FlexMask):
        return _flex_attention(query, key, value, attention_mask)
    if isinstance(attention_mask, ScaleBounds):
        return _per_scale_attention(query, key, value, attention_mask)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.to(attention_dtype(query))  # SDPA takes a bias in the dtype it runs in
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=1.0)
