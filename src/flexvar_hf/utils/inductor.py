"""Inductor heuristics for the compiled FlexVAR modules (fast sampling's `torch_compile=True`, train.py's
`--torch_compile`)."""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch._inductor import config
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

# Widest rows whose reductions (the LayerNorms) compile to one pass. Inductor's own limit is 1024 elements, so the
# 1536- and 1920-wide rows of d24 and d30 got looped reductions, which took d24's modulated LayerNorm to about four
# times its memory-bound time.
PERSISTENT_ROW_LIMIT = 2048

# These are Inductor's private extension points (the tests run them on torch 2.13, the benchmarks on 2.11). A torch
# whose heuristic has another signature, or without the config entry that puts a heuristics class into the cache
# keys, compiles with Inductor's own heuristics (`wide_row_persistent_reductions` warns).
SUPPORTED = hasattr(config, "inductor_choices_class") and list(
    inspect.signature(InductorChoices.should_use_persistent_reduction).parameters
) == ["features", "cooperative_reduction"]


class WideRowChoices(InductorChoices):
    """Inductor's heuristics, except that inner reductions over up to `PERSISTENT_ROW_LIMIT` elements are persistent
    (one pass over each row, held in registers)."""

    @staticmethod
    def should_use_persistent_reduction(features, cooperative_reduction: bool) -> bool:
        if (
            config.triton.persistent_reductions
            and not cooperative_reduction
            and features.get_reduction_hint() == ReductionHint.INNER
            and V.graph.sizevars.statically_known_leq(features.reduction_numel, PERSISTENT_ROW_LIMIT)
        ):
            return True
        return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)

    @staticmethod
    def uuid() -> str:
        """Part of Inductor's cache keys, so that kernels compiled without these heuristics are not reused."""
        return f"flexvar-persistent-rows-{PERSISTENT_ROW_LIMIT}"


@contextmanager
def wide_row_persistent_reductions() -> Iterator[None]:
    """Within this context, modules that Inductor compiles on this thread reduce rows of up to
    `PERSISTENT_ROW_LIMIT` elements in one pass instead of Inductor's limit of 1024 (results may differ by float
    rounding: another order of summation). Compilation happens at a compiled module's first call of a shape, so
    that call must run inside. A training step's backward may compile later in the autograd engine's thread: compile
    with `wide_row_inductor` for that. On a torch without these extension points this warns and leaves Inductor's
    heuristics in place."""
    if not SUPPORTED:
        warnings.warn(
            "Compiling with Inductor's own heuristics (slower LayerNorms at d24 and d30): this torch's "
            "InductorChoices has another interface.",
            stacklevel=3,
        )
        yield
        return
    # The handler is what code generation consults; the config entry puts the heuristics into the cache keys. The
    # handler goes first: Inductor makes a thread's heuristics object from the config entry the first time it is
    # needed and keeps it, so the thread's own one must exist before the entry changes.
    with V.set_choices_handler(WideRowChoices()), config.patch(inductor_choices_class=WideRowChoices):
        yield


def wide_row_inductor(model: torch.fx.GraphModule, example_inputs: Sequence) -> Callable:
    """A `torch.compile` backend: Inductor, with every graph it makes of the model compiled under
    `wide_row_persistent_reductions()`, the forward at the first call and the backward whenever and on whichever
    thread it compiles (the autograd engine's, for CUDA tensors). E.g.
    `transformer.compile_repeated_blocks(backend=wide_row_inductor, dynamic=True)`."""
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    @functools.wraps(compile_fx_inner)
    def compile_graph(*args, **kwargs):
        with wide_row_persistent_reductions():
            return compile_fx_inner(*args, **kwargs)

    with wide_row_persistent_reductions():  # also while AOTAutograd looks up its cache: the entry is in its key
        return compile_fx(model, example_inputs, inner_compile=compile_graph)
