"""The Triton norm-and-cache-write kernel against the PyTorch norm and copy it replaces.

Without CUDA the kernel runs in Triton's interpreter on CPU tensors (conftest.py sets `TRITON_INTERPRET=1`); on a GPU
machine the same tests run the compiled kernel on CUDA tensors, as part of the GPU suite (`pytest -m gpu`,
tests/test_gpu.py checks that it is compiled).
"""

from __future__ import annotations

import copy

import pytest
import torch

from flexvar_hf.models import transformer_flexvar
from flexvar_hf.models.transformer_flexvar import L2_EPS, normalize_and_copy

from conftest import relative_error
from test_models import TRAIN_SCALES, incremental_logits, tiny_transformer

pytest.importorskip("triton")
from flexvar_hf.models.kv_cache_kernel import normalize_and_cache  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, head_dim, length", [(3, 64, 5), (2, 8, 1), (5, 24, 9)])
def test_kernel_matches_torch_norm_and_copy(dtype, heads, head_dim, length):
    """Heads that are not a power of two, a head size below and off a power of two, one token and several; the
    tokens before `start` and after the written ones stay as they were."""
    torch.manual_seed(0)
    sequences, start, max_tokens = 3, 4, 4 + length + 2
    qkv = torch.randn(sequences, length, 3 * heads, head_dim, device=DEVICE).to(dtype)
    qkv[0, 0, :heads] = 0  # zero queries: the norm's floor keeps them zero instead of NaN
    temperature = torch.rand(heads, device=DEVICE).add(0.5).to(dtype)
    initial_cache = torch.randn(sequences, max_tokens, 2, heads, head_dim, device=DEVICE).to(dtype)
    cache = initial_cache.clone()
    query = normalize_and_cache(qkv, temperature, cache, start, L2_EPS)

    # The reference in float64 from the same inputs. In float32 the kernel does the same operations (its sums in
    # another order); in bfloat16 it rounds its float32 result once, as Inductor's fused norm does: within one unit
    # in the last place (Triton's interpreter rounds toward zero, a GPU to nearest).
    expected_cache = initial_cache.double()
    expected_query = normalize_and_copy(qkv.double(), temperature.double().view(1, 1, -1, 1), expected_cache, start)
    tolerance = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-5)

    assert query.shape == (sequences, length, heads, head_dim) and query.is_contiguous() and query.dtype == dtype
    assert torch.equal(query[0, 0], torch.zeros_like(query[0, 0]))
    torch.testing.assert_close(query.double(), expected_query, **tolerance)
    torch.testing.assert_close(cache.double(), expected_cache, **tolerance)
    assert torch.equal(cache[:, :start], initial_cache[:, :start])
    assert torch.equal(cache[:, start + length :], initial_cache[:, start + length :])
    assert torch.equal(cache[:, start : start + length, 1], qkv[:, :, 2 * heads :])  # values are copied as they are


def test_kernel_refuses_a_projection_with_strided_heads():
    qkv = torch.randn(2, 3, 4 * 6, 8, device=DEVICE)[:, :, ::2]  # every other head: not the projection's layout
    cache = torch.zeros(2, 5, 2, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        normalize_and_cache(qkv, torch.ones(4, device=DEVICE), cache, 0, L2_EPS)


@pytest.fixture
def kernel_everywhere(monkeypatch):
    """The cache takes the kernel for every tensor, CPU ones included (in the interpreter)."""
    monkeypatch.setattr(transformer_flexvar, "fused_cache_writer", lambda qkv: normalize_and_cache)


@torch.no_grad()
def test_incremental_path_with_kernel_equals_teacher_forcing_on_fixture(
    parity_transformer, reference, kernel_everywhere
):
    """The converted original model, fed scale by scale through the kernel-written cache, gives teacher forcing's
    logits (which never use the cache)."""
    model = copy.deepcopy(parity_transformer).to(DEVICE)
    labels, inputs = reference["labels"].to(DEVICE), reference["teacher_inputs"].to(DEVICE)
    scales = [(s, s) for s in TRAIN_SCALES]
    full = model(labels, scales, inputs).logits
    incremental = incremental_logits(model, labels, scales, inputs)
    assert relative_error(incremental, full) < 1e-5


@torch.no_grad()
def test_cached_logits_with_kernel_equal_the_copys(kernel_everywhere, monkeypatch):
    """A random model with three heads, scale by scale in float32: the kernel-written cache gives the logits (and
    greedy tokens) of the norm-and-copy one."""
    torch.manual_seed(0)
    model = tiny_transformer(num_layers=2, hidden_size=96, num_attention_heads=3).eval().to(DEVICE)
    labels = torch.tensor([0, 2, 3], device=DEVICE)
    scales = [(1, 1), (2, 3), (4, 4)]
    inputs = torch.randn(3, 6 + 16, 4, device=DEVICE)
    with_kernel = incremental_logits(model, labels, scales, inputs)
    monkeypatch.setattr(transformer_flexvar, "fused_cache_writer", lambda qkv: None)
    without = incremental_logits(model, labels, scales, inputs)
    assert torch.equal(with_kernel.argmax(-1), without.argmax(-1))
    assert relative_error(with_kernel, without) < 1e-6
