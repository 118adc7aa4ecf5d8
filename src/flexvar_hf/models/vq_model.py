"""FlexVQModel: the LlamaGen VQ-16 tokenizer used by FlexVAR, built from diffusers' VAE blocks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import Decoder, DecoderOutput, Encoder
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (see FlexVARModelMixin)
from diffusers.utils import BaseOutput

from ..scales import ScaleLike, as_hw
from .modeling_utils import FlexVARModelMixin
from .normalization import use_channels_last_group_norms

# Latent vectors per nearest-code search: its distance matrices are (rows, num_codes) float32, 584 MB each at the
# released codebook's 8912 codes; a d24 training batch's every scale (24 images x 680 tokens) fits in one search.
NEAREST_CODE_ROWS = 16384


@dataclass
class VQEncoderOutput(BaseOutput):
    """
    Args:
        latents (`torch.Tensor` of shape `(batch_size, code_dim, height // 16, width // 16)`):
            Continuous latents after `quant_conv`, before quantisation.
    """

    latents: torch.Tensor


class CosineVectorQuantizer(nn.Module):
    """Nearest-code lookup in an L2-normalised codebook (LlamaGen's `codebook_l2_norm=True` quantizer).

    Latent vectors and codebook rows are both normalised; the nearest code is the one at the smallest
    squared distance, i.e. the largest cosine similarity.
    """

    def __init__(self, num_codes: int, code_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_codes, code_dim)

    def normalized_codebook(self) -> torch.Tensor:
        """(num_codes, code_dim) unit-norm code vectors."""
        return F.normalize(self.embedding.weight, dim=-1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, code_dim, h, w) latents -> (B, h, w) LongTensor of code indices."""
        batch, _, height, width = latents.shape
        return self.nearest_codes(latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])).view(batch, height, width)

    def nearest_codes(self, vectors: torch.Tensor) -> torch.Tensor:
        """(N, code_dim) latent vectors (any norm) -> (N,) LongTensor: the index of each one's nearest normalised
        code. Rows are independent, so quantising several maps' rows in one call gives each map's indices; they are
        searched `NEAREST_CODE_ROWS` at a time, which bounds the (rows, num_codes) distance matrices."""
        vectors = F.normalize(vectors, dim=-1)
        codebook = self.normalized_codebook().to(vectors.dtype)
        codebook_norms = codebook.pow(2).sum(dim=1)
        # Same expansion of ||z - e||^2 as the original so that near-ties break identically.
        indices = [
            (rows.pow(2).sum(dim=1, keepdim=True) + codebook_norms - 2 * rows @ codebook.t()).argmin(dim=1)
            for rows in vectors.split(NEAREST_CODE_ROWS)
        ]
        return indices[0] if len(indices) == 1 else torch.cat(indices)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) indices -> (B, code_dim, h, w) normalised code vectors."""
        return F.embedding(indices, self.normalized_codebook()).permute(0, 3, 1, 2)


class FlexVQModel(FlexVARModelMixin, ConfigMixin):
    r"""
    The FlexVAR tokenizer: a LlamaGen VQ-16 convolutional autoencoder with an L2-normalised codebook. Images of any
    size divisible by 16 map to a (height / 16, width / 16) latent grid, and FlexVAR quantises that grid at many scales
    by area-resizing it first.

    Args:
        in_channels (`int`, defaults to 3): Image channels.
        out_channels (`int`, defaults to 3): Decoded image channels.
        base_channels (`int`, defaults to 128): Channels at full resolution.
        channel_multipliers (`tuple[int]`, defaults to `(1, 1, 2, 2, 4)`): Width of each level relative to
            `base_channels`; every level but the last halves the resolution, so 5 levels give a 16x downsampling.
        layers_per_block (`int`, defaults to 2): Residual blocks per encoder level (the decoder uses one more).
        z_channels (`int`, defaults to 256): Channels of the encoder output before `quant_conv`.
        num_codes (`int`, defaults to 8912): Codebook size.
        code_dim (`int`, defaults to 32): Code vector size.
        norm_num_groups (`int`, defaults to 32): GroupNorm groups.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        base_channels: int = 128,
        channel_multipliers: tuple[int, ...] = (1, 1, 2, 2, 4),
        layers_per_block: int = 2,
        z_channels: int = 256,
        num_codes: int = 8912,
        code_dim: int = 32,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        block_out_channels = tuple(base_channels * mult for mult in channel_multipliers)
        num_levels = len(block_out_channels)
        # LlamaGen puts self-attention after every residual block at the lowest resolution only.
        self.encoder = Encoder(
            in_channels=in_channels,
            out_channels=z_channels,
            down_block_types=("DownEncoderBlock2D",) * (num_levels - 1) + ("AttnDownEncoderBlock2D",),
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            double_z=False,
        )
        self.decoder = Decoder(
            in_channels=z_channels,
            out_channels=out_channels,
            up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * (num_levels - 1),
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
        )
        # Same parameters and numbers; faster once compiled in channels-last memory (`enable_fast_sampling`).
        use_channels_last_group_norms(self.decoder)
        self.quant_conv = nn.Conv2d(z_channels, code_dim, 1)
        self.post_quant_conv = nn.Conv2d(code_dim, z_channels, 1)
        self.quantize = CosineVectorQuantizer(num_codes, code_dim)

    @property
    def downsample_factor(self) -> int:
        """Pixels per token side."""
        return 2 ** (len(self.config.channel_multipliers) - 1)

    def encode(self, pixels: torch.Tensor, return_dict: bool = True) -> VQEncoderOutput | tuple[torch.Tensor]:
        """
        Args:
            pixels (`torch.Tensor` of shape `(B, 3, H, W)`): Images in [-1, 1]; H and W divisible by 16.

        Returns:
            `VQEncoderOutput` with `latents` of shape `(B, code_dim, H / 16, W / 16)`.
        """
        factor = self.downsample_factor
        if pixels.ndim != 4 or pixels.shape[-2] % factor or pixels.shape[-1] % factor:
            raise ValueError(
                f"`pixels` must be (B, C, H, W) with H and W divisible by {factor}, got shape {tuple(pixels.shape)}."
            )
        latents = self.quant_conv(self.encoder(pixels))
        if not return_dict:
            return (latents,)
        return VQEncoderOutput(latents=latents)

    def quantize_multiscale(self, latents: torch.Tensor, scales: Sequence[ScaleLike]) -> list[torch.Tensor]:
        """
        Quantise `latents` at every scale: area-resize to the scale, then take the nearest normalised code.

        Args:
            latents (`torch.Tensor` of shape `(B, code_dim, h, w)`): Output of `encode`.
            scales: Int sides or (h, w) pairs.

        Returns:
            One LongTensor of shape `(B, h_i, w_i)` per scale.
        """
        sizes = [as_hw(scale) for scale in scales]
        # Every scale's rows in one nearest-code search (a few kernel launches instead of a few per scale).
        vectors = torch.cat([F.interpolate(latents, size=size, mode="area").flatten(2) for size in sizes], dim=2)
        indices = self.quantize.nearest_codes(vectors.transpose(1, 2).reshape(-1, latents.shape[1]))
        indices = indices.view(latents.shape[0], -1).split([height * width for height, width in sizes], dim=1)
        return [grid.view(-1, *size) for grid, size in zip(indices, sizes)]

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) code indices -> (B, code_dim, h, w) normalised code vectors."""
        return self.quantize.lookup(indices)

    def decode_codes(self, codes: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        """(B, code_dim, h, w) code vectors -> `DecoderOutput` with `sample` (B, 3, 16h, 16w), about [-1, 1]."""
        codes = codes.to(self.post_quant_conv.weight.dtype)
        sample = self.decoder(self.post_quant_conv(codes))
        if not return_dict:
            return (sample,)
        return DecoderOutput(sample=sample)

    def decode_indices(self, indices: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        """
        Args:
            indices (`torch.LongTensor` of shape `(B, h, w)`): Code indices of any grid size.

        Returns:
            `DecoderOutput` with `sample` of shape `(B, 3, 16h, 16w)`, not clamped (about [-1, 1]).
        """
        if indices.ndim != 3:
            raise ValueError(f"`indices` must be (B, h, w), got shape {tuple(indices.shape)}.")
        return self.decode_codes(self.indices_to_codes(indices), return_dict=return_dict)

    def forward(self, pixels: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        """Encode, quantise at the full latent size and decode: the VQ reconstruction of `pixels`."""
        latents = self.encode(pixels).latents
        return self.decode_indices(self.quantize(latents), return_dict=return_dict)
