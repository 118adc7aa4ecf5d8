"""Classifier-free guidance: one combination of conditional and unconditional outputs, shared by the scheduler
(on logits) and the transformer (on the features its linear head reads)."""

from __future__ import annotations

import torch


def combine_guidance(stacked: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """`uncond + guidance_scale * (cond - uncond)` in float32, for `stacked = cat([cond, uncond])` of shape
    `(2B, ...)` -> `(B, ...)`; just `cond` where `guidance_scale == 1`."""
    if stacked.shape[0] % 2:
        raise ValueError(
            f"Guidance needs conditional and unconditional rows stacked along the batch, got an odd batch of "
            f"{stacked.shape[0]}."
        )
    cond, uncond = stacked.float().chunk(2)
    if guidance_scale == 1:
        return cond
    return uncond + guidance_scale * (cond - uncond)
