"""Float8 inference for the transformer's linear layers: e4m3 weights with one scale per output channel, e4m3
activations with one scale per row computed at every call, products by `torch._scaled_mm`.

Opt-in and inference only (`FlexVARTransformer2DModel.enable_float8_inference`): the products' rounding error grows
about 20 times against bfloat16 (benchmarks/RESULTS.md, run 28), so images differ from the bfloat16 model's.
"""

from __future__ import annotations

import torch
import torch.nn as nn

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

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and hidden_states.requires_grad:
            raise RuntimeError("Float8Linear is for inference: it has no backward. Train the bfloat16 model.")
        rows = hidden_states.reshape(-1, self.in_features)
        # cuBLASLt has no fast-accumulation kernel for d24's second feed-forward product (6144 -> 1536) up to at
        # least 72 rows on an H200, padded or not (run 34 of benchmarks/RESULTS.md): fewer rows accumulate exactly.
        fast = self.fast_accumulation and rows.shape[0] >= FAST_ACCUMULATION_MIN_ROWS
        quantized, scales = quantize_rows(rows)
        bias = None if self.bias is None else self.bias.to(hidden_states.dtype)
        out = torch._scaled_mm(
            quantized,
            self.weight.t(),
            scale_a=scales,
            scale_b=self.weight_scale,
            bias=bias,
            out_dtype=hidden_states.dtype,
            use_fast_accum=fast,
        )
        return out.view(*hidden_states.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float8=e4m3"
