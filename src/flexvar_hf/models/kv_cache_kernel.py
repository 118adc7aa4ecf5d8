"""One Triton kernel for the cached attention's inputs: normalise a scale's queries and keys and write its keys and
values into the key/value cache.

Without it, generation runs the query/key norm as a compiled kernel that writes the whole normalised projection,
then copies the keys and values from that strided view into the cache: the projection's 3 * hidden values per token
are read and written twice. This kernel reads the projection once and writes each value once.

Triton is imported only by the kernel modules; `FlexVARKVCache` imports this one only when it writes CUDA tensors.
With `TRITON_INTERPRET=1` set before the import the kernel runs on CPU tensors (how the tests check it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# The token count and offset change with every scale; specialising on them would compile a kernel per scale.
@triton.jit(do_not_specialize=["tokens_per_sequence", "start"])
def _normalize_and_cache_kernel(
    qkv_ptr,
    temperature_ptr,
    query_ptr,
    cache_ptr,
    tokens_per_sequence,
    start,
    qkv_stride_sequence,
    qkv_stride_token,
    cache_stride_sequence,
    cache_stride_token,
    eps,
    HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    # One program per token: its (3, HEADS, HEAD_DIM) projection row, one (BLOCK_HEADS, BLOCK_DIM) tile per part.
    row = tl.program_id(0)
    sequence = (row // tokens_per_sequence).to(tl.int64)
    token = row % tokens_per_sequence
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    dims = tl.arange(0, BLOCK_DIM)[None, :]
    mask = (heads < HEADS) & (dims < HEAD_DIM)
    within_part = heads * HEAD_DIM + dims
    width = HEADS * HEAD_DIM
    source = qkv_ptr + sequence * qkv_stride_sequence + token * qkv_stride_token + within_part
    target = cache_ptr + sequence * cache_stride_sequence + (start + token) * cache_stride_token + within_part

    # The float32 operations of `normalize_queries_keys` (IEEE square roots, as PyTorch's, not Triton's fast ones):
    # factor = numerator / max(norm, eps), then x * factor.
    query = tl.load(source, mask=mask, other=0.0).to(tl.float32)
    temperature = tl.load(temperature_ptr + heads, mask=heads < HEADS, other=1.0).to(tl.float32)
    query_norm = tl.maximum(tl.sqrt_rn(tl.sum(query * query, axis=1)), eps)[:, None]
    query_out = query * (temperature / query_norm)
    tl.store(query_ptr + row.to(tl.int64) * width + within_part, query_out.to(query_ptr.dtype.element_ty), mask=mask)

    key = tl.load(source + width, mask=mask, other=0.0).to(tl.float32)
    key_norm = tl.maximum(tl.sqrt_rn(tl.sum(key * key, axis=1)), eps)[:, None]
    tl.store(target, (key * (1.0 / key_norm)).to(cache_ptr.dtype.element_ty), mask=mask)

    value = tl.load(source + 2 * width, mask=mask, other=0.0)
    tl.store(target + width, value.to(cache_ptr.dtype.element_ty), mask=mask)


def normalize_and_cache(
    qkv: torch.Tensor, temperature: torch.Tensor, cache: torch.Tensor, start: int, eps: float
) -> torch.Tensor:
    """
    Normalise and cache one call's projection.

    Args:
        qkv (`torch.Tensor` of shape `(B, l, 3 * H, D)`): The projection, heads of queries, keys, then values; each
            token's `3 * H * D` values contiguous.
        temperature (`torch.Tensor` with `H` elements): Per-head factor of the queries.
        cache (`torch.Tensor` of shape `(B, max_tokens, 2, H, D)`): One layer's keys and values, each token's
            `2 * H * D` values contiguous. Tokens `start` to `start + l` get the unit keys and the values.
        start (`int`): Tokens already cached.
        eps (`float`): Floor of the norms, as `F.normalize`'s.

    Returns:
        `torch.Tensor` of shape `(B, l, H, D)`, contiguous: the unit queries times their head's temperature.
    """
    sequences, length, _, head_dim = qkv.shape
    heads = cache.shape[3]
    if qkv.stride(2) != head_dim or qkv.stride(3) != 1 or cache[0, 0].stride() != (heads * head_dim, head_dim, 1):
        raise ValueError("`normalize_and_cache` needs each token's heads contiguous in `qkv` and in `cache`.")
    query = qkv.new_empty(sequences, length, heads, head_dim)
    if query.numel() == 0:
        return query
    _normalize_and_cache_kernel[(sequences * length,)](
        qkv,
        temperature.reshape(heads).contiguous(),
        query,
        cache,
        length,
        start,
        qkv.stride(0),
        qkv.stride(1),
        cache.stride(0),
        cache.stride(1),
        eps,
        HEADS=heads,
        HEAD_DIM=head_dim,
        BLOCK_HEADS=triton.next_power_of_2(heads),
        BLOCK_DIM=triton.next_power_of_2(head_dim),
    )
    return query
