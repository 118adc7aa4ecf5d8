"""The Triton kernels of float8 inference (GELU and quantisation, AdaLN and quantisation) against the PyTorch
operations they replace.

Without CUDA the kernel runs in Triton's interpreter on CPU tensors (conftest.py sets `TRITON_INTERPRET=1`); on a GPU
machine the same tests run the compiled kernels on CUDA tensors, as part of the GPU suite (`pytest -m gpu`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward

from flexvar_hf.models import float8
from flexvar_hf.models.float8 import (
    MIN_SCALE,
    Float8FeedForward,
    gelu_quantize_rows,
    modulated_layer_norm_quantize_rows,
    quantize_rows,
)

from conftest import relative_error
from test_models import tiny_transformer

pytest.importorskip("triton")
from flexvar_hf.models.float8_kernel import (  # noqa: E402
    MAX_WIDTH,
    fused_gelu_quantize_rows,
    fused_modulated_layer_norm_quantize_rows,
    fused_residual_modulated_layer_norm_quantize_rows,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# On NVIDIA GPUs the GELU kernel takes the hardware tanh (relative error about 2^-11), elsewhere exp in float32.
HARDWARE_TANH = DEVICE == "cuda" and torch.version.hip is None
GELU_RTOL = 1e-3 if HARDWARE_TANH else 1e-6
# The interpreter evaluates exp in NumPy, which warns where it overflows to inf (GELU of inputs below about -9: 0).
pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")]


def kernel(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return fused_gelu_quantize_rows(values, MIN_SCALE, float8.FLOAT8_MAX)


def rows_of_every_magnitude(num_rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows from 1e-3 to about 30 in size, a few large entries in each (so that most of a row lands in float8's
    lower range and subnormals), a zero row and a row of large negative inputs (GELU 0)."""
    torch.manual_seed(0)
    values = torch.randn(num_rows, width) * torch.logspace(-3, 1.5, num_rows)[:, None]
    values[:, :3] *= 30
    values[1] = 0
    values[2] = -20 - torch.rand(width)
    return values.to(DEVICE, dtype)


def assert_quantized_alike(quantized, scales, expected, expected_scales, scale_rtol=1e-5):
    """The kernels compute in float32 (the references take float64; a LayerNorm's sums over a row lose a few float32
    units), so a value may round to the next float8 value where float64 lies within float32's error of a midpoint
    between two."""
    assert quantized.dtype == torch.float8_e4m3fn and quantized.shape == expected.shape
    assert scales.dtype == torch.float32 and scales.shape == expected_scales.shape
    torch.testing.assert_close(scales, expected_scales, rtol=scale_rtol, atol=0)
    differs = quantized.float() != expected.float()
    assert differs.float().mean() < 1e-3  # none when written
    steps = (expected.float().abs() * 2**-3).clamp_min(2**-9)  # one float8 step: 3 mantissa bits, subnormals 2^-9
    assert ((quantized.float() - expected.float()).abs() <= steps).all()
    subnormal = (expected.float().abs() < 2**-6) & (expected.float() != 0)  # the interpreter's kernels round these
    assert (quantized.float()[subnormal] != expected.float()[subnormal]).sum() <= 1 + 0.1 * subnormal.sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [1, 300, 1536])
def test_gelu_kernel_matches_the_pytorch_gelu_and_quantisation(dtype, width):
    values = rows_of_every_magnitude(24, width, dtype)
    quantized, scales = kernel(values)
    expected, expected_scales = quantize_rows(F.gelu(values.double(), approximate="tanh"))
    assert_quantized_alike(quantized, scales, expected, expected_scales, scale_rtol=max(GELU_RTOL, 1e-5))
    assert torch.equal(quantized[1:3].float(), torch.zeros(2, width, device=DEVICE))  # zero rows stay zero, not NaN
    if width > 1:  # most of a row lies far below its largest values: float8's subnormals
        assert ((expected.float().abs() < 2**-6) & (expected.float() != 0)).sum() > 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [1, 300, 1536])
def test_layer_norm_kernel_matches_the_pytorch_adaln_and_quantisation(dtype, width):
    """Three sequences of eight tokens, each token a row of another magnitude, with their own shift and scale
    (views into one tensor of six terms, as `FlexVARBlock.modulation` makes them); the tokens a strided view too."""
    rows = rows_of_every_magnitude(24, width, dtype)[3:].add(torch.linspace(-3, 3, 21, device=DEVICE)[:, None])
    rows = torch.cat((rows, rows[:3].flip(-1))).to(dtype)  # no constant rows: their LayerNorm amplifies rounding
    hidden_states = torch.zeros(3, 10, width + 5, device=DEVICE, dtype=dtype)[:, 1:9, 2 : 2 + width]
    hidden_states.copy_(rows.view(3, 8, width))  # tokens width + 5 apart, sequences 10 tokens apart
    terms = torch.randn(3, 1, 6 * width, device=DEVICE).mul(0.5).to(dtype).chunk(6, dim=-1)
    shift, scale = terms[3], terms[4] + 1
    norm = torch.nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
    quantized, scales = fused_modulated_layer_norm_quantize_rows(
        hidden_states, shift, scale, norm.eps, MIN_SCALE, float8.FLOAT8_MAX
    )
    normed = F.layer_norm(hidden_states.double(), (width,), eps=norm.eps)
    expected, expected_scales = quantize_rows(torch.addcmul(shift.double(), normed, scale.double()).view(-1, width))
    assert_quantized_alike(quantized, scales, expected, expected_scales)
    # The CPU path of `float8.modulated_layer_norm_quantize_rows`, in float32 operations, agrees as well.
    cpu = modulated_layer_norm_quantize_rows(norm, hidden_states.cpu(), shift.cpu(), scale.cpu())
    assert cpu.shape == hidden_states.shape and cpu.dtype == dtype
    assert_quantized_alike(cpu.values, cpu.scales, expected.cpu(), expected_scales.cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_layer_norm_kernel_updates_the_residual_stream_first(dtype):
    torch.manual_seed(0)
    hidden_states = torch.randn(3, 5, 200, device=DEVICE).to(dtype)
    update = torch.randn(3, 5, 200, device=DEVICE).to(dtype)
    terms = torch.randn(3, 1, 6 * 200, device=DEVICE).to(dtype).chunk(6, dim=-1)
    gate, shift, scale = terms[2], terms[3], terms[4] + 1
    residual, quantized, scales = fused_residual_modulated_layer_norm_quantize_rows(
        hidden_states, gate, update, shift, scale, 1e-6, MIN_SCALE, float8.FLOAT8_MAX
    )
    expected_residual = torch.addcmul(hidden_states.double(), gate.double(), update.double())
    # Rounded once to the dtype: within one unit in the last place in bfloat16 (the interpreter rounds toward zero)
    tolerance = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-5)
    torch.testing.assert_close(residual.double(), expected_residual, **tolerance)
    normed = F.layer_norm(residual.double(), (200,), eps=1e-6)
    expected, expected_scales = quantize_rows(torch.addcmul(shift.double(), normed, scale.double()).view(-1, 200))
    assert_quantized_alike(quantized, scales, expected, expected_scales)
    with pytest.raises(ValueError, match="in its layout"):
        fused_residual_modulated_layer_norm_quantize_rows(
            hidden_states, gate, update.transpose(0, 1).contiguous().transpose(0, 1), shift, scale, 1e-6, 1e-12, 448.0
        )


def test_layer_norm_kernel_refuses_other_shapes():
    hidden_states = torch.randn(2, 3, 8, device=DEVICE)
    terms = torch.ones(2, 1, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"must be \(2, 1, 8\) with contiguous rows"):
        fused_modulated_layer_norm_quantize_rows(hidden_states, terms[:1], terms, 1e-6, MIN_SCALE, 448.0)
    with pytest.raises(ValueError, match="contiguous rows"):
        fused_modulated_layer_norm_quantize_rows(hidden_states.transpose(1, 2), terms, terms, 1e-6, MIN_SCALE, 448.0)
    with pytest.raises(ValueError, match="without affine parameters"):
        modulated_layer_norm_quantize_rows(torch.nn.LayerNorm(8), hidden_states, terms, terms)


def test_kernel_reads_rows_of_a_wider_tensor_and_takes_no_rows():
    wide = rows_of_every_magnitude(6, 512, torch.bfloat16)
    view = wide[:, 100:400]  # rows 512 apart, 300 wide
    quantized, scales = kernel(view)
    expected, expected_scales = kernel(view.contiguous())
    assert torch.equal(quantized.float(), expected.float()) and torch.equal(scales, expected_scales)
    empty, empty_scales = kernel(wide[:0])
    assert empty.shape == (0, 512) and empty_scales.shape == (0, 1)


def test_kernel_refuses_strided_or_too_wide_rows():
    with pytest.raises(ValueError, match="contiguous rows"):
        kernel(torch.randn(8, 4, device=DEVICE).t())
    with pytest.raises(ValueError, match=f"up to {MAX_WIDTH} wide"):
        kernel(torch.randn(2, MAX_WIDTH + 1, device=DEVICE))


@pytest.fixture
def kernel_everywhere(monkeypatch):
    """Float8 inference takes the kernels for every tensor, CPU ones included (in the interpreter)."""
    monkeypatch.setattr(float8, "fuses", lambda values: True)


def test_pytorch_path_matches_the_kernel():
    """What CPU tensors run (the module path), against the kernel on the same rows."""
    values = rows_of_every_magnitude(16, 200, torch.bfloat16).cpu()
    quantized, scales = gelu_quantize_rows(values)
    expected, expected_scales = kernel(values.to(DEVICE))
    torch.testing.assert_close(scales, expected_scales.cpu(), rtol=GELU_RTOL, atol=0)
    assert (quantized.float() != expected.float().cpu()).float().mean() < 1e-3


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float8_feed_forward_with_the_kernel_approximates_the_layer(dtype, kernel_everywhere):
    torch.manual_seed(0)
    ff = FeedForward(64, inner_dim=256, activation_fn="gelu-approximate").to(DEVICE, dtype)
    quantized = Float8FeedForward(ff)
    hidden_states = torch.randn(2, 5, 64, device=DEVICE, dtype=dtype)
    out = quantized(hidden_states)
    assert out.shape == hidden_states.shape and out.dtype == dtype
    assert 1e-3 < relative_error(out, ff(hidden_states)) < 0.05  # float8's error


def test_float8_feed_forward_refuses_another_activation():
    with pytest.raises(ValueError, match="tanh GELU"):
        Float8FeedForward(FeedForward(16, inner_dim=32, activation_fn="geglu"))


@torch.no_grad()
def test_float8_transformer_with_the_kernels_gives_the_pytorch_paths_logits(kernel_everywhere, monkeypatch):
    torch.manual_seed(0)
    model = tiny_transformer(num_layers=2, hidden_size=96, num_attention_heads=3).eval().to(DEVICE)
    model.enable_float8_inference()
    labels = torch.tensor([0, 2, 3], device=DEVICE)
    scales = [(1, 1), (2, 3), (4, 4)]
    inputs = torch.randn(3, 6 + 16, 4, device=DEVICE)
    with_kernel = model(labels, scales, inputs).logits
    monkeypatch.setattr(float8, "fuses", lambda values: False)
    without = model(labels, scales, inputs).logits
    assert torch.equal(with_kernel.argmax(-1), without.argmax(-1))
    assert relative_error(with_kernel, without) < (1e-3 if HARDWARE_TANH else 1e-4)
