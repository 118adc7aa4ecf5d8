"""Float8 inference (`enable_float8_inference`, `Float8Linear`) on the CPU, where `torch._scaled_mm` runs too."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from flexvar_hf.models import float8
from flexvar_hf.models.float8 import (
    FAST_ACCUMULATION_MIN_ROWS,
    FLOAT8_MAX,
    Float8FeedForward,
    Float8Linear,
    quantize_rows,
)

from conftest import RELATIVE_TOLERANCE, relative_error
from test_models import TRAIN_SCALES, tiny_transformer


def test_quantize_rows_scales_each_row_to_the_float8_range():
    torch.manual_seed(0)
    values = torch.randn(5, 40) * torch.tensor([1e-3, 1.0, 30.0, 1.0, 1.0])[:, None]
    values[3] = 0  # a zero row stays zero (not NaN)
    quantized, scales = quantize_rows(values)
    assert quantized.dtype == torch.float8_e4m3fn and scales.shape == (5, 1) and scales.dtype == torch.float32
    restored = quantized.float() * scales
    assert torch.equal(restored[3], torch.zeros(40))
    assert torch.equal(quantized.float().abs().amax(dim=1)[[0, 1, 2, 4]], torch.full((4,), FLOAT8_MAX))
    # e4m3 keeps 3 mantissa bits: each value within 2^-4 of itself, relative, above the subnormal range
    large = values.abs() > scales * 2**-6
    assert ((restored - values).abs() <= values.abs() * 2**-4)[large].all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float8_linear_approximates_the_layer(dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 48).to(dtype)
    torch.nn.init.normal_(linear.bias)
    layer = Float8Linear(linear)
    hidden_states = torch.randn(2, 7, 96, dtype=dtype)
    out = layer(hidden_states)
    expected = linear(hidden_states)
    assert out.shape == (2, 7, 48) and out.dtype == dtype
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (1, 48)
    # float8's error, not bfloat16's: above the float32 tolerance and within e4m3's rounding of both operands
    assert 1e-3 < relative_error(out, expected) < 0.05


def test_fast_accumulation_only_for_products_of_enough_rows(monkeypatch):
    calls = []
    scaled_mm = torch._scaled_mm

    def recording(*args, use_fast_accum, **kwargs):
        calls.append((args[0].shape[0], use_fast_accum))
        return scaled_mm(*args, use_fast_accum=use_fast_accum, **kwargs)

    monkeypatch.setattr(float8.torch, "_scaled_mm", recording)
    linear = torch.nn.Linear(16, 8)
    for fast in (True, False):
        layer = Float8Linear(linear, fast_accumulation=fast)
        for rows in (1, FAST_ACCUMULATION_MIN_ROWS - 1, FAST_ACCUMULATION_MIN_ROWS):
            layer(torch.randn(rows, 16))
    n = FAST_ACCUMULATION_MIN_ROWS
    assert calls == [(1, False), (n - 1, False), (n, True), (1, False), (n - 1, False), (n, False)]


@torch.no_grad()
def test_float8_transformer_stays_close_to_the_original_logits(parity_transformer, reference):
    """The converted original model with float8 blocks: its teacher-forcing logits move by float8's rounding (more
    than a float32 port may, far less than the logits' size), and the greedy tokens mostly agree."""
    model = copy.deepcopy(parity_transformer)
    model.enable_float8_inference()
    assert model.float8_inference and not parity_transformer.float8_inference
    assert isinstance(model.blocks[0].attn.to_qkv, Float8Linear)
    assert isinstance(model.blocks[-1].ff, Float8FeedForward)
    assert isinstance(model.blocks[-1].ff.proj_out, Float8Linear)
    assert type(model.proj_out) is torch.nn.Linear and type(model.blocks[0].norm1.linear) is torch.nn.Linear
    logits = model(reference["labels"], TRAIN_SCALES, reference["teacher_inputs"]).logits
    error = relative_error(logits, reference["teacher_logits"])
    assert RELATIVE_TOLERANCE < error < 0.03  # 0.011 when written
    agreement = (logits.argmax(-1) == reference["teacher_logits"].argmax(-1)).float().mean()
    assert agreement > 0.9  # 0.983 when written


def test_float8_model_refuses_training_saving_and_a_second_quantisation(tmp_path):
    model = tiny_transformer()
    model.enable_float8_inference()
    with pytest.raises(ValueError, match="already enabled"):
        model.enable_float8_inference()
    with pytest.raises(ValueError, match="cannot be saved"):
        model.save_pretrained(tmp_path / "float8")
    assert not (tmp_path / "float8").exists()
    hidden_states = torch.randn(2, 3, 32, requires_grad=True)
    with pytest.raises(RuntimeError, match="no backward"):
        model.blocks[0].attn.to_out(hidden_states)
    F.linear(hidden_states, torch.ones(4, 32)).sum().backward()  # the refusal leaves autograd usable
