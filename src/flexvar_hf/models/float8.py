"""Float8 inference for the transformer's linear layers: e4m3 weights with one scale per output channel, e4m3
activations with one scale per row computed at every call, products by `torch._scaled_mm`.

Opt-in and inference only (`FlexVARTransformer2DModel.enable_float8_inference`): the products' rounding error grows
about 20 times against bfloat16, so images differ from the bfloat16 model's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention import FeedForward

try:  # Triton, which comes with every CUDA build of PyTorch: `gelu_quantize_rows`' one-pass kernel
    from .float8_kernel import MAX_WIDTH as FUSED_MAX_WIDTH
    from .float8_kernel import (
        fused_gelu_quantize_rows,
        fused_modulated_layer_norm_quantize_rows,
        fused_residual_modulated_layer_norm_quantize_rows,
    )
except ImportError:
    fused_gelu_quantize_rows = None

FLOAT8 = torch.float8_e4m3fn
FLOAT8_MAX = torch.finfo(FLOAT8).max
# Rows of zeros get this scale instead of zero, so that their quantised values stay zero rather than NaN.
MIN_SCALE = 1e-12
# Products of fewer rows than this accumulate exactly even with `fast_accumulation` (see `Float8Linear.forward`).
FAST_ACCUMULATION_MIN_ROWS = 128


def quantize_rows(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) values -> float8 (M, K) and the float32 (M, 1) scales that multiply them back: each row's largest
    magnitude maps to float8's largest finite value."""
    scales = values.abs().amax(dim=-1, keepdim=True).float().clamp_min(MIN_SCALE) / FLOAT8_MAX
    return (values.float() / scales).to(FLOAT8), scales


class QuantizedRows(NamedTuple):
    """Activations quantised for a `Float8Linear` by the pass that made them: float8 (M, K) `values` and float32
    (M, 1) `scales` of rows of `shape` (..., K), which the layer's output keeps (with its own width) in `dtype`."""

    values: torch.Tensor
    scales: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype


def fuses(values: torch.Tensor) -> bool:
    """Whether `values` take the one-pass Triton kernels of `float8_kernel`: CUDA tensors, rows up to 8192 wide."""
    return values.is_cuda and fused_gelu_quantize_rows is not None and values.shape[-1] <= FUSED_MAX_WIDTH


def gelu_quantize_rows(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows` of the tanh GELU of (M, K) rows, the GELU in float32 (not rounded to `values`' dtype before
    the quantisation). Where `fuses(values)`, one Triton kernel, equal up to float32 rounding (on NVIDIA GPUs, up to
    the hardware tanh's error of about 2^-11, see `float8_kernel.fused_gelu_quantize_rows`)."""
    if fuses(values):
        return fused_gelu_quantize_rows(values, MIN_SCALE, FLOAT8_MAX)
    return quantize_rows(F.gelu(values.float(), approximate="tanh"))


def modulated_layer_norm_quantize_rows(
    norm: nn.LayerNorm, hidden_states: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor
) -> QuantizedRows:
    """`quantize_rows` of the AdaLN `shift + norm(hidden_states) * scale` ((B, L, D) with (B, 1, D) terms, a
    LayerNorm without affine parameters), in float32 up to the quantisation. Where `fuses(hidden_states)`, one Triton
    kernel, equal up to float32 rounding."""
    check_plain_norm(norm)
    width = norm.normalized_shape[0]
    if fuses(hidden_states):
        values, scales = fused_modulated_layer_norm_quantize_rows(
            hidden_states, shift, scale, norm.eps, MIN_SCALE, FLOAT8_MAX
        )
    else:
        normed = F.layer_norm(hidden_states.float(), (width,), eps=norm.eps)
        values, scales = quantize_rows(torch.addcmul(shift.float(), normed, scale.float()).reshape(-1, width))
    return QuantizedRows(values, scales, hidden_states.shape, hidden_states.dtype)


def residual_modulated_layer_norm_quantize_rows(
    norm: nn.LayerNorm,
    hidden_states: torch.Tensor,
    gate: torch.Tensor,
    update: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
) -> tuple[torch.Tensor, QuantizedRows]:
    """The residual stream `hidden_states + gate * update` ((B, L, D), the (B, 1, D) gate, `update` laid out as
    `hidden_states`) and `modulated_layer_norm_quantize_rows` of it. Where `fuses(hidden_states)`, one Triton kernel
    for both."""
    if fuses(hidden_states):
        check_plain_norm(norm)
        residual, values, scales = fused_residual_modulated_layer_norm_quantize_rows(
            hidden_states, gate, update, shift, scale, norm.eps, MIN_SCALE, FLOAT8_MAX
        )
        return residual, QuantizedRows(values, scales, residual.shape, residual.dtype)
    residual = torch.addcmul(hidden_states, gate, update)
    return residual, modulated_layer_norm_quantize_rows(norm, residual, shift, scale)


def check_plain_norm(norm: nn.LayerNorm) -> None:
    if norm.weight is not None or norm.bias is not None:
        raise ValueError("The float8 AdaLN takes a LayerNorm without affine parameters.")


class Float8Linear(nn.Module):
    """
    `nn.Linear` for inference with float8 weights and activations.

    Args:
        linear (`nn.Linear`): The layer to quantise; its weight is read once, its bias kept in its dtype.
        bias (`torch.Tensor`, *optional*): A bias to use instead of the layer's (the attention's projection, whose
            query and value biases are parameters of the attention).
        fast_accumulation (`bool`, defaults to False): `torch._scaled_mm`'s `use_fast_accum` (on Hopper GPUs, a
            faster product that accumulates in lower precision).

    Outputs have the input's dtype; inputs are (..., in_features), any floating dtype.
    """

    def __init__(self, linear: nn.Linear, bias: torch.Tensor | None = None, fast_accumulation: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.fast_accumulation = fast_accumulation
        weight, scales = quantize_rows(linear.weight.detach())
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scales.t().contiguous())  # (1, out_features)
        bias = linear.bias if bias is None else bias
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, hidden_states: torch.Tensor | QuantizedRows) -> torch.Tensor:
        """(..., in_features) -> (..., out_features); `QuantizedRows` are multiplied as they are."""
        if isinstance(hidden_states, QuantizedRows):
            quantized, scales = hidden_states.values, hidden_states.scales
        elif torch.is_grad_enabled() and hidden_states.requires_grad:
            raise RuntimeError("Float8Linear is for inference: it has no backward. Train the bfloat16 model.")
        else:
            quantized, scales = quantize_rows(hidden_states.reshape(-1, self.in_features))
        out = self.multiply_quantized(quantized, scales, hidden_states.dtype)
        return out.view(*hidden_states.shape[:-1], self.out_features)

    def multiply_quantized(self, quantized: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The layer on (M, in_features) rows already quantised (`quantize_rows`' values and scales): (M,
        out_features) in `dtype`."""
        # cuBLASLt has no fast-accumulation kernel for d24's second feed-forward product (6144 -> 1536) up to at
        # least 72 rows on an H200, padded or not: fewer rows accumulate exactly.
        fast = self.fast_accumulation and quantized.shape[0] >= FAST_ACCUMULATION_MIN_ROWS
        bias = None if self.bias is None else self.bias.to(dtype)
        # cuBLASLt adds no bias to a float32 output (`_scaled_mm` refuses it on CUDA): added afterwards there.
        separate_bias = bias is not None and dtype == torch.float32
        out = torch._scaled_mm(
            quantized,
            self.weight.t(),
            scale_a=scales,
            scale_b=self.weight_scale,
            bias=None if separate_bias else bias,
            out_dtype=dtype,
            use_fast_accum=fast,
        )
        return out + bias if separate_bias else out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float8=e4m3"


class Float8FeedForward(nn.Module):
    """
    diffusers' `FeedForward` (tanh GELU, for inference: no dropout) with both projections as `Float8Linear`, and the
    GELU and the second projection's quantisation as one pass (`gelu_quantize_rows`): the 4x-wide activations are
    read once and written once, in float8.

    Args:
        ff (`FeedForward`): The layer to quantise, `activation_fn="gelu-approximate"`.
        fast_accumulation (`bool`, defaults to False): See `Float8Linear`.
    """

    def __init__(self, ff: FeedForward, fast_accumulation: bool = False):
        super().__init__()
        activation = ff.net[0]
        if getattr(activation, "approximate", None) != "tanh":
            raise ValueError(f"Float8FeedForward takes a feed-forward with a tanh GELU, got {type(activation)}.")
        self.proj_in = Float8Linear(activation.proj, fast_accumulation=fast_accumulation)
        self.proj_out = Float8Linear(ff.net[-1], fast_accumulation=fast_accumulation)

    def forward(self, hidden_states: torch.Tensor | QuantizedRows) -> torch.Tensor:
        """(..., dim) -> (..., dim) in the input's dtype."""
        projected = self.proj_in(hidden_states)
        quantized, scales = gelu_quantize_rows(projected.reshape(-1, projected.shape[-1]))
        out = self.proj_out.multiply_quantized(quantized, scales, projected.dtype)
        return out.view(*hidden_states.shape[:-1], -1)
