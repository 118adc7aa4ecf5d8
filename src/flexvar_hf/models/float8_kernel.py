"""Triton kernels that quantise float8 inference's activations in the pass that produces them, instead of in a pass
of their own over activations already written in bfloat16.

- `fused_gelu_quantize_rows`: the tanh GELU between the feed-forward's two products and the second product's
  per-row quantisation, which Inductor compiled into one slower kernel (`benchmarks/bench_fp8.py` times both).
- `fused_modulated_layer_norm_quantize_rows`: a block's AdaLN (LayerNorm, then shift and scale per sequence) and the
  quantisation of the product after it; `fused_residual_modulated_layer_norm_quantize_rows` adds an update of the
  residual stream first, as Inductor's LayerNorm kernel did. Compiled, Inductor kept the LayerNorms apart from their
  quantisations, each pass reading and writing the rows again.

Each program holds one row in registers. The kernels are `torch.library.triton_op`s, so that `torch.compile` keeps
them inside a compiled block's graph (a plain Python call of a Triton kernel would split the graph there). Only the
kernel modules import Triton; `float8` imports this one where Triton is installed. With `TRITON_INTERPRET=1` set
before the import the kernels run on CPU tensors (how the tests check them).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

# Rows wider than this do not fit in one program's registers (d30's 7680 do).
MAX_WIDTH = 8192
# 4 warps (128 threads) a row: the fastest of 4, 8 and 16 for d24's 6144-wide GELU rows with the hardware tanh
# (`benchmarks/bench_fp8.py` sweeps them).
NUM_WARPS = 4
# 2 warps for the LayerNorms' 1024- to 1920-wide rows: the fastest of 1 to 16 for d24's.
LAYER_NORM_NUM_WARPS = 2
SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2 / math.pi))
# float8 e4m3: 3 mantissa bits, and below 2^-6 subnormals that are multiples of 2^-9.
MIN_NORMAL = tl.constexpr(2.0**-6)
# Adding 1.5 * 2^14 (float32 spacing 2^-9 from 2^14 to 2^15) rounds a float32 of magnitude below 2^-6 to a multiple of
# 2^-9, ties to even, whatever its sign.
SUBNORMAL_ROUNDING = tl.constexpr(1.5 * 2.0**14)


@triton.jit
def _round_to_float8_grid(values):
    """float32 values (|v| <= 448) rounded to the nearest e4m3 value, ties to even, still as float32, in integer and
    float32 arithmetic: Triton's interpreter converts to float8 without carrying a rounded-up mantissa into the
    exponent (31.1 became 16), but converts values already on the float8 grid exactly."""
    bits = values.to(tl.uint32, bitcast=True)
    # Normal range: add just under half a unit of the 3-bit mantissa, plus the kept last bit for ties to even.
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    subnormal = (values + SUBNORMAL_ROUNDING) - SUBNORMAL_ROUNDING
    return tl.where(tl.abs(values) < MIN_NORMAL, subnormal, normal)


@triton.jit
def _store_quantized_row(
    values,
    mask,
    quantized_ptr,
    scale_ptr,
    MIN_SCALE: tl.constexpr,
    FLOAT8_MAX: tl.constexpr,
    SOFTWARE_ROUNDING: tl.constexpr,
):
    """`float8.quantize_rows` of one float32 row (`values`, 0 where `mask` is False): its scale to `scale_ptr`, its
    float8 values to `quantized_ptr` (the scale applied as a product with its reciprocal)."""
    scale = tl.maximum(tl.max(tl.abs(values), axis=0), MIN_SCALE) / FLOAT8_MAX
    tl.store(scale_ptr, scale)
    scaled = values * (1.0 / scale)
    if SOFTWARE_ROUNDING:  # on GPUs the conversion itself rounds to nearest even
        scaled = _round_to_float8_grid(scaled)
    columns = tl.arange(0, values.shape[0])
    tl.store(quantized_ptr + columns, scaled.to(quantized_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _hardware_tanh(values):
    """tanh of float32 values by NVIDIA GPUs' special function unit (PTX `tanh.approx.f32`, error about 2^-11)."""
    return tl.inline_asm_elementwise(
        "tanh.approx.f32 $0, $1;", "=r,r", [values], dtype=tl.float32, is_pure=True, pack=1
    )


@triton.jit
def _gelu_quantize_rows_kernel(
    values_ptr,
    quantized_ptr,
    scales_ptr,
    width,
    row_stride,
    MIN_SCALE: tl.constexpr,
    FLOAT8_MAX: tl.constexpr,
    BLOCK: tl.constexpr,
    SOFTWARE_ROUNDING: tl.constexpr,
    HARDWARE_TANH: tl.constexpr,
):
    # One program per row, the whole row in registers.
    row = tl.program_id(0).to(tl.int64)
    columns = tl.arange(0, BLOCK)
    mask = columns < width
    x = tl.load(values_ptr + row * row_stride + columns, mask=mask, other=0.0).to(tl.float32)
    # The tanh GELU, 0.5 * x * (1 + tanh(u)) with u = sqrt(2 / pi) * (x + 0.044715 x^3).
    inner = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
    if HARDWARE_TANH:
        # About a third fewer instructions than the form below, and 1e-4 of the float8 values one step apart on a
        # d24 generation's rows. Its error is far below float8's 2^-4 steps.
        activated = 0.5 * x + 0.5 * x * _hardware_tanh(inner)
    else:  # x * sigmoid(2u), the same function through exp, which Triton's interpreter and AMD GPUs have too
        activated = x / (1.0 + tl.exp(-2.0 * inner))
    _store_quantized_row(
        activated, mask, quantized_ptr + row * width, scales_ptr + row, MIN_SCALE, FLOAT8_MAX, SOFTWARE_ROUNDING
    )


@triton_op("flexvar_hf::fused_gelu_quantize_rows", mutates_args=())
def fused_gelu_quantize_rows(
    values: torch.Tensor, min_scale: float, float8_max: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    `float8.gelu_quantize_rows` in one pass: the tanh GELU of (M, K) rows (`K <= MAX_WIDTH`, each row contiguous,
    any float dtype) in float32, quantised per row to float8 e4m3 with scales `max(row amax, min_scale) /
    float8_max`. Equal to that function's PyTorch operations up to float32 rounding (the scale applied as a product
    with its reciprocal), on NVIDIA GPUs up to the hardware tanh's relative error of about 2^-11 (elsewhere the GELU
    goes through `exp`).

    Returns:
        The float8 e4m3 (M, K) values and the float32 (M, 1) scales that multiply them back.
    """
    rows, width = values.shape
    if width > MAX_WIDTH or values.stride(1) != 1:
        message = f"The fused GELU quantisation takes contiguous rows up to {MAX_WIDTH} wide, got {values.shape}."
        raise ValueError(message)
    quantized = torch.empty(rows, width, dtype=torch.float8_e4m3fn, device=values.device)
    scales = torch.empty(rows, 1, dtype=torch.float32, device=values.device)
    if rows > 0:
        launch_gelu_quantize_rows(values, quantized, scales, min_scale, float8_max)
    return quantized, scales


def launch_gelu_quantize_rows(
    values: torch.Tensor,
    quantized: torch.Tensor,
    scales: torch.Tensor,
    min_scale: float,
    float8_max: float,
    num_warps: int = NUM_WARPS,
) -> None:
    """The kernel of `fused_gelu_quantize_rows` on its checked (M, K) `values` into the float8 (M, K) `quantized`
    and float32 (M, 1) `scales` (also what benchmarks/bench_fp8.py times at other warp counts)."""
    rows, width = values.shape
    wrap_triton(_gelu_quantize_rows_kernel)[(rows,)](
        values,
        quantized,
        scales,
        width,
        values.stride(0),
        MIN_SCALE=min_scale,
        FLOAT8_MAX=float8_max,
        BLOCK=triton.next_power_of_2(width),
        SOFTWARE_ROUNDING=_interpreted(),
        HARDWARE_TANH=not _interpreted() and torch.version.hip is None,
        num_warps=num_warps,
    )


@triton.jit
def _modulated_layer_norm_quantize_kernel(
    values_ptr,
    gate_ptr,
    update_ptr,
    residual_ptr,
    shift_ptr,
    scale_ptr,
    quantized_ptr,
    scales_ptr,
    width,
    tokens_per_sequence,
    stride_sequence,
    stride_token,
    gate_stride,
    shift_stride,
    scale_stride,
    EPS: tl.constexpr,
    MIN_SCALE: tl.constexpr,
    FLOAT8_MAX: tl.constexpr,
    BLOCK: tl.constexpr,
    ADD_RESIDUAL: tl.constexpr,
    SOFTWARE_ROUNDING: tl.constexpr,
):
    # One program per token, the whole row in registers; the gate, shift and scale of its sequence.
    row = tl.program_id(0)
    sequence = (row // tokens_per_sequence).to(tl.int64)
    token = row % tokens_per_sequence
    columns = tl.arange(0, BLOCK)
    mask = columns < width
    offset = sequence * stride_sequence + token * stride_token + columns
    x = tl.load(values_ptr + offset, mask=mask, other=0.0).to(tl.float32)
    if ADD_RESIDUAL:  # the residual stream's update first, rounded to its dtype as `torch.addcmul` would
        gate = tl.load(gate_ptr + sequence * gate_stride + columns, mask=mask, other=0.0).to(tl.float32)
        update = tl.load(update_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        residual = (x + gate * update).to(residual_ptr.dtype.element_ty)
        tl.store(residual_ptr + offset, residual, mask=mask)
        x = residual.to(tl.float32)
    mean = tl.sum(x, axis=0) / width
    centered = tl.where(mask, x - mean, 0.0)
    inverse_std = 1.0 / tl.sqrt_rn(tl.sum(centered * centered, axis=0) / width + EPS)
    shift = tl.load(shift_ptr + sequence * shift_stride + columns, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + sequence * scale_stride + columns, mask=mask, other=0.0).to(tl.float32)
    modulated = shift + centered * inverse_std * scale
    row_offset = row.to(tl.int64)
    quantized_row, scale_of_row = quantized_ptr + row_offset * width, scales_ptr + row_offset
    _store_quantized_row(modulated, mask, quantized_row, scale_of_row, MIN_SCALE, FLOAT8_MAX, SOFTWARE_ROUNDING)


def _layer_norm_quantize(
    values: torch.Tensor,
    gate: torch.Tensor | None,
    update: torch.Tensor | None,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    min_scale: float,
    float8_max: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Checks and launches `_modulated_layer_norm_quantize_kernel`; returns the quantised rows, their scales and,
    with `gate` and `update`, the new residual stream."""
    sequences, length, width = values.shape
    terms = (shift, scale) if gate is None else (shift, scale, gate)
    if width > MAX_WIDTH or values.stride(2) != 1 or (update is not None and update.stride() != values.stride()):
        message = f"The fused LayerNorm quantisation takes contiguous rows up to {MAX_WIDTH} wide, got {values.shape}"
        raise ValueError(f"{message} (an update of the residual stream in its layout).")
    if any(term.shape != (sequences, 1, width) or term.stride(2) != 1 for term in terms):
        shapes = ", ".join(str(tuple(term.shape)) for term in terms)
        raise ValueError(f"The modulation terms must be ({sequences}, 1, {width}) with contiguous rows, got {shapes}.")
    quantized = torch.empty(sequences * length, width, dtype=torch.float8_e4m3fn, device=values.device)
    scales = torch.empty(sequences * length, 1, dtype=torch.float32, device=values.device)
    residual = None
    if gate is not None:  # in the layout of `values` (and `update`), which the kernel indexes all three by
        residual = torch.empty_strided(values.shape, values.stride(), dtype=values.dtype, device=values.device)
    if sequences * length > 0:
        wrap_triton(_modulated_layer_norm_quantize_kernel)[(sequences * length,)](
            values,
            values if gate is None else gate,  # the three are not read without ADD_RESIDUAL
            values if update is None else update,
            values if residual is None else residual,
            shift,
            scale,
            quantized,
            scales,
            width,
            length,
            values.stride(0),
            values.stride(1),
            shift.stride(0) if gate is None else gate.stride(0),
            shift.stride(0),
            scale.stride(0),
            EPS=eps,
            MIN_SCALE=min_scale,
            FLOAT8_MAX=float8_max,
            BLOCK=triton.next_power_of_2(width),
            ADD_RESIDUAL=gate is not None,
            SOFTWARE_ROUNDING=_interpreted(),
            num_warps=LAYER_NORM_NUM_WARPS,
        )
    return quantized, scales, residual


@triton_op("flexvar_hf::fused_modulated_layer_norm_quantize_rows", mutates_args=())
def fused_modulated_layer_norm_quantize_rows(
    values: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, min_scale: float, float8_max: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    `float8.modulated_layer_norm_quantize_rows` in one pass: `shift + layer_norm(values) * scale` (no affine
    parameters) for (B, L, K) `values` (`K <= MAX_WIDTH`, each row contiguous) with (B, 1, K) `shift` and `scale`,
    in float32, quantised per row as `fused_gelu_quantize_rows` does.

    Returns:
        The float8 e4m3 (B * L, K) values and the float32 (B * L, 1) scales that multiply them back.
    """
    quantized, scales, _ = _layer_norm_quantize(values, None, None, shift, scale, eps, min_scale, float8_max)
    return quantized, scales


@triton_op("flexvar_hf::fused_residual_modulated_layer_norm_quantize_rows", mutates_args=())
def fused_residual_modulated_layer_norm_quantize_rows(
    values: torch.Tensor,
    gate: torch.Tensor,
    update: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    min_scale: float,
    float8_max: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    `fused_modulated_layer_norm_quantize_rows` of the residual stream `values + gate * update` ((B, 1, K) `gate`,
    (B, L, K) `update` laid out as `values`), which it also writes: an update of a block's residual stream (its
    attention's, or the previous block's feed-forward's) and the AdaLN after it in one pass, as Inductor fused them
    before the quantisation joined the norm.

    Returns:
        The new (B, L, K) residual stream in `values`' dtype, the float8 e4m3 (B * L, K) values and their float32
        (B * L, 1) scales.
    """
    quantized, scales, residual = _layer_norm_quantize(values, gate, update, shift, scale, eps, min_scale, float8_max)
    return residual, quantized, scales


def _interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter, whose float8 conversion needs `_round_to_float8_grid`."""
    return os.environ.get("TRITON_INTERPRET") == "1"
