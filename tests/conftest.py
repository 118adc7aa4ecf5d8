"""Shared fixtures: the parity checkpoints in ../shared/parity and the outputs the original code computed."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

# Without CUDA, Triton kernels run in Triton's interpreter on CPU tensors (tests/test_kv_cache_kernel.py). Triton
# reads the variable when it is first imported, which importing diffusers does, so it is set before anything else.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
PARITY_DIR = Path(os.environ.get("FLEXVAR_PARITY_DIR", REPO_ROOT.parent / "shared" / "parity" / "original_d2"))

# Tolerances stated in ../shared/parity/README.md for a correct float32 port on CPU.
RELATIVE_TOLERANCE = 1e-4
PIXEL_TOLERANCE = 1e-3


# GPU tests (`@pytest.mark.gpu` with this) skip on machines without CUDA, saying how to run them.
requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: part of the GPU suite, run on a GPU machine with `python -m pytest -q -m gpu` "
    "(docs/testing.md)",
)


# Test dependencies that the `test` extra cannot install: torch-fidelity (its torchvision requirement would replace the
# CPU torch; `.ci/run` installs it with --no-deps) and Debian's Chromium (apt). The tests needing them skip, naming the
# install step, on a machine without them, and fail where this variable is 1 (`.ci/run` sets it), so CI runs them all.
REQUIRE_ALL_VARIABLE = "FLEXVAR_REQUIRE_ALL_TESTS"


def require(available: bool, what: str, install: str) -> None:
    """Skip the calling test (or fixture) when `available` is False, or fail it under FLEXVAR_REQUIRE_ALL_TESTS=1."""
    if available:
        return
    message = f"{what} is not installed: {install}"
    if os.environ.get(REQUIRE_ALL_VARIABLE) == "1":
        pytest.fail(f"{message} ({REQUIRE_ALL_VARIABLE}=1: every test must run)")
    pytest.skip(f"{message} (.ci/run does)")


def require_torch_fidelity() -> None:
    try:
        available = importlib.util.find_spec("torch_fidelity") is not None
    except ModuleNotFoundError:
        available = False
    require(available, "torch-fidelity", 'pip install --no-deps "torch-fidelity>=0.4,<0.5"')


def load_example(name: str):
    """The module `examples/{name}.py` (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"flexvar_example_{name}", REPO_ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    # Registered so that dataclasses can look the module up and worker processes can unpickle its functions.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def with_active_blocks(transformer, gate_gain: float = 20.0):
    """`transformer` (a FlexVARTransformer2DModel) re-initialised with AdaLN gates of about 0.3, so that its blocks
    carry a good part of the logits as a trained model's do (without them the tiny models' logits move by about 30%).
    The constructor's training-from-scratch gates (1e-5 of the other rows) keep a random model's blocks out of its
    outputs, and a test comparing two block paths (attention backends, caches, kernels, float8) would pass whatever
    the blocks compute."""
    transformer.initialize_weights(adaln_gate_gain=gate_gain)
    return transformer


class GraphCapture:
    """A `torch.compile` backend that keeps every graph Dynamo hands it (`graphs`) and runs it uncompiled."""

    def __init__(self):
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, graph_module: torch.fx.GraphModule, example_inputs):
        self.graphs.append(graph_module)
        return graph_module.forward


def first_score_minus_100(shape, generator: torch.Generator, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(query, key) of `shape` (B, H, L, D) at the edge of FlexVAR's score range: unit keys, queries of norm 100, and
    the first query pointing away from the first key, so that the first token's only visible score is -100."""
    key = torch.nn.functional.normalize(torch.randn(shape, generator=generator, device=device), dim=-1)
    query = 100 * torch.nn.functional.normalize(torch.randn(shape, generator=generator, device=device), dim=-1)
    query[:, :, 0] = -100 * key[:, :, 0]
    return query, key


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    if not (PARITY_DIR / "reference.safetensors").is_file():
        pytest.fail(f"Parity fixtures not found at {PARITY_DIR} (set FLEXVAR_PARITY_DIR).")
    return PARITY_DIR


@pytest.fixture(scope="session")
def reference(parity_dir) -> dict[str, torch.Tensor]:
    return load_file(parity_dir / "reference.safetensors")


@pytest.fixture(scope="session")
def reference_info(parity_dir) -> dict:
    return json.loads((parity_dir / "reference.json").read_text())


@pytest.fixture(scope="session")
def transformer_ckpt(parity_dir) -> Path:
    return parity_dir / "transformer_original.pth"


@pytest.fixture(scope="session")
def vq_ckpt(parity_dir) -> Path:
    return parity_dir / "vq_original.pth"


@pytest.fixture(scope="session")
def parity_vq(vq_ckpt):
    from flexvar_hf.conversion import load_original_vq

    return load_original_vq(vq_ckpt)


@pytest.fixture(scope="session")
def parity_transformer(transformer_ckpt):
    from flexvar_hf.conversion import load_original_transformer

    return load_original_transformer(transformer_ckpt)
