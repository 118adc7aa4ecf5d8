"""Numerical precision switches shared by the evaluation and the benchmarks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def without_tf32() -> Iterator[None]:
    """Float32 matrix products and convolutions in full float32 inside (no TF32), the previous settings after."""
    backends = (torch.backends.cuda.matmul, torch.backends.cudnn)
    saved = [backend.allow_tf32 for backend in backends]
    for backend in backends:
        backend.allow_tf32 = False
    try:
        yield
    finally:
        for backend, allow in zip(backends, saved):
            backend.allow_tf32 = allow
