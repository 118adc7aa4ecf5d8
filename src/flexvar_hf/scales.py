"""Helpers for scale lists: a scale is the (height, width) of a token grid."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from .utils.transfer import to_device
from .utils.validation import is_int

ScaleLike = int | Sequence[int]


def round_half_up_ratio(numerator: int, denominator: int) -> int:
    """`round(numerator / denominator)` for non-negative ints, halves rounded up, in exact integer arithmetic."""
    return (2 * numerator + denominator) // (2 * denominator)


def as_hw(scale: ScaleLike) -> tuple[int, int]:
    """Turn an int side or an (h, w) pair into an (h, w) tuple of positive ints."""
    if isinstance(scale, torch.Tensor):
        scale = scale.tolist()
    if is_int(scale):
        pair = (int(scale), int(scale))
    elif isinstance(scale, Sequence) and len(scale) == 2 and all(is_int(side) for side in scale):
        pair = (int(scale[0]), int(scale[1]))
    else:
        raise ValueError(f"A scale must be an int side or an (h, w) pair of ints, got {scale!r}.")
    if pair[0] < 1 or pair[1] < 1:
        raise ValueError(f"Scale sides must be positive, got {scale!r}.")
    return pair


def as_hw_list(scales: Sequence[ScaleLike]) -> list[tuple[int, int]]:
    """Normalise a list of scales; raises ValueError on an empty or malformed list."""
    if isinstance(scales, (int, str)) or not isinstance(scales, Sequence) or len(scales) == 0:
        raise ValueError(f"`scales` must be a non-empty list of int sides or (h, w) pairs, got {scales!r}.")
    return [as_hw(scale) for scale in scales]


def num_tokens(scales: Sequence[tuple[int, int]]) -> int:
    """Total number of tokens over all scales."""
    return sum(h * w for h, w in scales)


# The cubic convolution constant of PyTorch's (and OpenCV's) bicubic interpolation.
BICUBIC_A = -0.75


@functools.cache
def bicubic_matrix(in_size: int, out_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(out_size, in_size) matrix that resizes one axis as `F.interpolate(mode="bicubic", align_corners=False)`
    does: half-pixel source positions, four cubic-convolution taps, indices clamped at the edges (their weights add
    up on the edge sample). Built in float64, kept per device and dtype."""
    source = (torch.arange(out_size, dtype=torch.float64) + 0.5) * (in_size / out_size) - 0.5
    base = source.floor()
    offset = source - base

    def near(x: torch.Tensor) -> torch.Tensor:  # |x| <= 1
        return ((BICUBIC_A + 2) * x - (BICUBIC_A + 3)) * x * x + 1

    def far(x: torch.Tensor) -> torch.Tensor:  # 1 < |x| < 2
        return ((BICUBIC_A * x - 5 * BICUBIC_A) * x + 8 * BICUBIC_A) * x - 4 * BICUBIC_A

    weights = torch.stack((far(offset + 1), near(offset), near(1 - offset), far(2 - offset)), dim=1)
    taps = (base.long()[:, None] + torch.arange(-1, 3)).clamp(0, in_size - 1)
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64).scatter_add_(1, taps, weights)
    return to_device(matrix.to(dtype), device)


def resize_codes(codes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a code map (B, C, h, w) to `size`, as FlexVAR does between scales: the numbers of
    `F.interpolate(codes, size, mode="bicubic")` up to rounding, computed as two small matrix products (in float32,
    or float64 for float64 maps) because PyTorch's CUDA bicubic kernel runs one thread per output pixel and loops
    over batch and channels."""
    compute_dtype = torch.promote_types(codes.dtype, torch.float32)
    rows = bicubic_matrix(codes.shape[-2], size[0], codes.device, compute_dtype)
    columns = bicubic_matrix(codes.shape[-1], size[1], codes.device, compute_dtype)
    return (rows @ codes.to(compute_dtype) @ columns.T).to(codes.dtype)


def flatten_grid(grid: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C), row-major."""
    return grid.flatten(2).transpose(1, 2)
