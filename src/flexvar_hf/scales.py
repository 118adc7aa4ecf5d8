"""Helpers for scale lists: a scale is the (height, width) of a token grid."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

import torch
import torch.nn.functional as F

ScaleLike = int | Sequence[int]


def is_int(value) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


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


def resize_codes(codes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a code map (B, C, h, w) to `size`, as FlexVAR does between scales."""
    return F.interpolate(codes, size=size, mode="bicubic")


def flatten_grid(grid: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C), row-major."""
    return grid.flatten(2).transpose(1, 2)
