"""Training losses for `FlexVQModel`: straight-through quantisation, codebook and commitment losses, multi-scale
reconstruction (FlexVAR's scalable tokenizer) and codebook upkeep.

Nothing here changes what the model computes at inference: quantisation picks the same code as
`CosineVectorQuantizer.forward` (nearest normalised code), and decoding goes through `FlexVQModel.decode_codes`.

The losses follow LlamaGen's `codebook_l2_norm=True` quantizer, which FlexVAR's tokenizer uses. With `z` the
L2-normalised latent vector and `e` its nearest L2-normalised code:

- codebook loss `mean((e - sg[z])^2)` moves the codes towards the latents,
- commitment loss `mean((sg[e] - z)^2)` (weighted by beta, 0.25 by default) keeps the encoder near its codes,
- the decoder sees `z + sg[e - z]`: the code's value forward, the identity backward (straight-through estimator).

FlexVAR trains its tokenizer for many scales: the latent map is area-downsampled to K random smaller scales, each is
quantised, and the decoder reconstructs each one at its own resolution (a latent of (h, w) gives an image of
(f h, f w) for a downsampling factor f), compared with the input area-downsampled to that size. `multiscale_vq_loss`
does this for the full scale plus `num_extra_scales` random ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.vq_model import CosineVectorQuantizer, FlexVQModel
from ..scales import round_half_up_ratio


@dataclass
class StraightThroughOutput:
    """
    Args:
        codes (`torch.Tensor` of shape `(B, code_dim, h, w)`): The nearest normalised code vectors in the forward
            pass; gradients pass unchanged to the normalised latents (straight-through).
        indices (`torch.LongTensor` of shape `(B, h, w)`): The chosen codes.
        codebook_loss (`torch.Tensor`): `mean((e - sg[z])^2)`, gradients to the codebook only.
        commitment_loss (`torch.Tensor`): `mean((sg[e] - z)^2)`, gradients to the encoder only (not yet weighted).
    """

    codes: torch.Tensor
    indices: torch.LongTensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor


def quantize_straight_through(quantizer: CosineVectorQuantizer, latents: torch.Tensor) -> StraightThroughOutput:
    """Quantise `(B, code_dim, h, w)` latents for training (see `StraightThroughOutput`).

    Runs in float32 whatever the autocast state, so that the nearest-code search matches inference in float32."""
    with torch.autocast(device_type=latents.device.type, enabled=False):
        latents = latents.float()
        normalized = F.normalize(latents, dim=1)
        with torch.no_grad():
            indices = quantizer(latents)
        codes = quantizer.lookup(indices).float()  # differentiable w.r.t. the codebook
        codebook_loss = F.mse_loss(codes, normalized.detach())
        commitment_loss = F.mse_loss(normalized, codes.detach())
        straight_through = normalized + (codes - normalized).detach()
    return StraightThroughOutput(straight_through, indices, codebook_loss, commitment_loss)


def reconstruction_loss(
    reconstruction: torch.Tensor, target: torch.Tensor, l1_weight: float = 1.0, l2_weight: float = 1.0
) -> torch.Tensor:
    """`l1_weight * mean|x - y| + l2_weight * mean (x - y)^2`, in float32."""
    difference = reconstruction.float() - target.float()
    loss = difference.new_zeros(())
    if l1_weight:
        loss = loss + l1_weight * difference.abs().mean()
    if l2_weight:
        loss = loss + l2_weight * difference.pow(2).mean()
    return loss


def downsample_pixels(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area (box-filter) resize of images to `size`, the target of a smaller scale's reconstruction."""
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    return F.interpolate(pixels, size=size, mode="area")


def sample_extra_scales(
    latent_size: tuple[int, int],
    num_scales: int,
    min_side: int = 1,
    generator: torch.Generator | None = None,
) -> list[tuple[int, int]]:
    """
    `num_scales` distinct random scales smaller than `latent_size`, keeping its aspect ratio.

    The long side is drawn uniformly from `[min_side, long - 1]`; the short side is `round(long_k * short / long)`,
    at least 1. Fewer scales come back when fewer exist.
    """
    height, width = latent_size
    long_side, short_side = max(height, width), min(height, width)
    candidates = list(range(max(1, min_side), long_side))
    if not candidates or num_scales <= 0:
        return []
    order = torch.randperm(len(candidates), generator=generator)[:num_scales].tolist()
    scales = []
    for side in sorted(candidates[i] for i in order):
        other = max(1, round_half_up_ratio(side * short_side, long_side))
        scales.append((side, other) if height >= width else (other, side))
    return scales


@dataclass
class VQLossOutput:
    """
    Args:
        loss (`torch.Tensor`): The total to minimise.
        reconstruction_loss (`torch.Tensor`): Mean over scales of the pixel loss.
        codebook_loss (`torch.Tensor`), commitment_loss (`torch.Tensor`): Means over scales, unweighted.
        full_scale_reconstruction_loss (`torch.Tensor`): Pixel loss of the full-scale reconstruction alone.
        reconstruction (`torch.Tensor`): The full-scale reconstruction `(B, 3, H, W)`.
        indices (`torch.LongTensor`): The full-scale codes `(B, h, w)`.
        latents (`torch.Tensor`): The encoder's latents `(B, code_dim, h, w)`, for codebook upkeep.
        scales (`list`): The latent scales used, the full one first.
    """

    loss: torch.Tensor
    reconstruction_loss: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    full_scale_reconstruction_loss: torch.Tensor
    reconstruction: torch.Tensor
    indices: torch.LongTensor
    latents: torch.Tensor
    scales: list[tuple[int, int]] = field(default_factory=list)


def multiscale_vq_loss(
    model: FlexVQModel,
    pixels: torch.Tensor,
    extra_scales: Sequence[tuple[int, int]] = (),
    l1_weight: float = 1.0,
    l2_weight: float = 1.0,
    codebook_weight: float = 1.0,
    commitment_weight: float = 0.25,
    extra_scale_weight: float = 1.0,
) -> VQLossOutput:
    """
    The tokenizer's training loss for a batch of images in [-1, 1].

    The full-scale latents are quantised (straight-through) and decoded; so is each latent map area-downsampled to
    one of `extra_scales`, decoded at its own resolution and compared with the area-downsampled images. Each extra
    scale's losses count `extra_scale_weight` times the full scale's; the terms are averaged over the total weight.

    Returns:
        `VQLossOutput`.
    """
    latents = model.encode(pixels).latents
    factor = model.downsample_factor
    full_scale = tuple(latents.shape[-2:])
    scales = [full_scale] + [tuple(scale) for scale in extra_scales if tuple(scale) != full_scale]
    weights = [1.0] + [extra_scale_weight] * (len(scales) - 1)
    total_weight = sum(weights)

    reconstruction_total = codebook_total = commitment_total = latents.new_zeros((), dtype=torch.float32)
    full = None
    for scale, weight in zip(scales, weights):
        scale_latents = latents if scale == full_scale else F.interpolate(latents.float(), size=scale, mode="area")
        quantized = quantize_straight_through(model.quantize, scale_latents)
        decoded = model.decode_codes(quantized.codes).sample
        target = downsample_pixels(pixels, (scale[0] * factor, scale[1] * factor))
        pixel_loss = reconstruction_loss(decoded, target, l1_weight, l2_weight)
        reconstruction_total = reconstruction_total + weight * pixel_loss
        codebook_total = codebook_total + weight * quantized.codebook_loss
        commitment_total = commitment_total + weight * quantized.commitment_loss
        if full is None:
            full = (pixel_loss, decoded, quantized.indices)

    reconstruction_mean = reconstruction_total / total_weight
    codebook_mean = codebook_total / total_weight
    commitment_mean = commitment_total / total_weight
    loss = reconstruction_mean + codebook_weight * codebook_mean + commitment_weight * commitment_mean
    return VQLossOutput(
        loss=loss,
        reconstruction_loss=reconstruction_mean.detach(),
        codebook_loss=codebook_mean.detach(),
        commitment_loss=commitment_mean.detach(),
        full_scale_reconstruction_loss=full[0].detach(),
        reconstruction=full[1],
        indices=full[2],
        latents=latents,
        scales=scales,
    )


class FlexVQTrainingModule(nn.Module):
    """`multiscale_vq_loss` as a module's `forward`, so that a distributed wrapper (DDP, through
    `accelerator.prepare`) sees the training computation; `self.vqvae` is the `FlexVQModel` being trained."""

    def __init__(self, vqvae: FlexVQModel, **loss_kwargs):
        super().__init__()
        self.vqvae = vqvae
        self.loss_kwargs = loss_kwargs

    def forward(self, pixels: torch.Tensor, extra_scales: Sequence[tuple[int, int]] = ()) -> VQLossOutput:
        return multiscale_vq_loss(self.vqvae, pixels, extra_scales, **self.loss_kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Codebook statistics and upkeep


def codebook_usage(indices: torch.Tensor, num_codes: int) -> tuple[float, float]:
    """(fraction of the codebook used, perplexity of the code histogram) over `indices`."""
    counts = torch.bincount(indices.flatten(), minlength=num_codes).float()
    probs = counts / counts.sum().clamp_min(1)
    perplexity = torch.exp(-(probs * probs.clamp_min(1e-12).log()).sum())
    return (counts > 0).float().mean().item(), perplexity.item()


class CodeUsageTracker:
    """Counts how often each code was chosen since the last `reset`."""

    def __init__(self, num_codes: int, device: torch.device | str | None = None):
        self.counts = torch.zeros(num_codes, dtype=torch.long, device=device)

    def update(self, indices: torch.Tensor) -> None:
        self.counts += torch.bincount(indices.flatten().to(self.counts.device), minlength=len(self.counts))

    def reset(self) -> None:
        self.counts.zero_()


@torch.no_grad()
def restart_dead_codes(
    quantizer: CosineVectorQuantizer,
    counts: torch.Tensor,
    latents: torch.Tensor,
    generator: torch.Generator | None = None,
    noise: float = 0.01,
) -> int:
    """
    Move every code with a zero count to a random latent vector (plus a little noise) of `latents`.

    `counts` must be the same on every process (reduce it first) and so must `latents` (gather them) and the
    generator's state, so that every process makes the same change. Returns how many codes moved.
    """
    dead = (counts == 0).nonzero().flatten()
    if len(dead) == 0:
        return 0
    vectors = F.normalize(latents.detach().float().permute(0, 2, 3, 1).reshape(-1, latents.shape[1]), dim=-1)
    picks = torch.randint(len(vectors), (len(dead),), generator=generator, device="cpu").to(vectors.device)
    chosen = vectors[picks]
    jitter = torch.randn(chosen.shape, generator=generator, device="cpu").to(chosen.device)
    new_codes = F.normalize(chosen + noise * jitter, dim=-1)
    weight = quantizer.embedding.weight
    # The codebook is normalised on use, so only the direction matters; keep the rows' typical norm.
    scale = weight.norm(dim=-1).mean()
    weight[dead.to(weight.device)] = (new_codes * scale).to(weight.dtype)
    return len(dead)
