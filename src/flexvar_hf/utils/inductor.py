"""Inductor heuristics for the compiled FlexVAR modules (`enable_fast_sampling(torch_compile=True)`)."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

from torch._inductor import config
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

# These are Inductor's private extension points (the tests run them on torch 2.13, the benchmarks on 2.11). With a
# torch whose heuristic has another signature, importing this module raises ImportError, and the caller compiles
# with Inductor's own heuristics.
if list(inspect.signature(InductorChoices.should_use_persistent_reduction).parameters) != [
    "features",
    "cooperative_reduction",
]:
    raise ImportError("This torch's InductorChoices.should_use_persistent_reduction has another signature.")

# Widest rows whose reductions (the LayerNorms) compile to one pass. Inductor's own limit is 1024 elements, so the
# 1536- and 1920-wide rows of d24 and d30 got looped reductions, which took d24's modulated LayerNorm to about four
# times its memory-bound time.
PERSISTENT_ROW_LIMIT = 2048
# Inductor's own heuristic, taken at import: `WideRowChoices` defers to it, and a caller that installs
# `WideRowChoices`' heuristic on `InductorChoices` itself (for every thread) restores it from here.
INDUCTORS_PERSISTENT_REDUCTION = InductorChoices.__dict__["should_use_persistent_reduction"]


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
        return INDUCTORS_PERSISTENT_REDUCTION.__func__(features, cooperative_reduction)

    @staticmethod
    def uuid() -> str:
        """Part of Inductor's cache keys, so that kernels compiled without these heuristics are not reused."""
        return f"flexvar-persistent-rows-{PERSISTENT_ROW_LIMIT}"


@contextmanager
def wide_row_persistent_reductions() -> Iterator[None]:
    """Within this context, modules that Inductor compiles (on this thread) reduce rows of up to
    `PERSISTENT_ROW_LIMIT` elements in one pass instead of Inductor's limit of 1024 (results may differ by float
    rounding: another order of summation). Compilation happens at a compiled module's first call, so that call must
    run inside."""
    # The handler is what code generation consults (Inductor reads its config entry once per thread); the config
    # entry, where this torch has it, puts the heuristics into Inductor's cache keys.
    with V.set_choices_handler(WideRowChoices()):
        if hasattr(config, "inductor_choices_class"):
            with config.patch(inductor_choices_class=WideRowChoices):
                yield
        else:
            yield
