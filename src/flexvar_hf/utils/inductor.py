"""Inductor heuristics for the compiled FlexVAR modules (`enable_fast_sampling(torch_compile=True)`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# Widest rows whose reductions (the LayerNorms) compile to one pass. Inductor's own limit is 1024 elements, so the
# 1536- and 1920-wide rows of d24 and d30 got looped reductions: run 11 of benchmarks/RESULTS.md timed d24's modulated
# LayerNorm at 85 us a call at batch 64, about four times its memory-bound time.
PERSISTENT_ROW_LIMIT = 2048


def _wide_row_choices(limit: int):
    """An `InductorChoices` that also makes inner reductions over up to `limit` elements persistent."""
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    class WideRowChoices(InductorChoices):
        @staticmethod
        def should_use_persistent_reduction(features, cooperative_reduction: bool) -> bool:
            if (
                torch._inductor.config.triton.persistent_reductions
                and not cooperative_reduction
                and features.get_reduction_hint() == ReductionHint.INNER
                and V.graph.sizevars.statically_known_leq(features.reduction_numel, limit)
            ):
                return True
            return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)

        @staticmethod
        def uuid() -> str:  # part of Inductor's cache keys, so that kernels compiled without it are not reused
            return f"flexvar-persistent-rows-{limit}"

    return WideRowChoices


@contextmanager
def wide_row_persistent_reductions(limit: int = PERSISTENT_ROW_LIMIT) -> Iterator[None]:
    """Within this context, modules compiled by Inductor (on this thread) reduce rows of up to `limit` elements in one
    pass instead of Inductor's limit of 1024 (results may differ by float rounding: another order of summation).
    Compilation happens at a compiled module's first call, so that call must run inside."""
    from torch._inductor import config
    from torch._inductor.virtualized import V

    choices_class = _wide_row_choices(limit)
    # The config entry puts the heuristic into Inductor's cache keys (torch versions that have it); the handler is
    # what codegen consults, since Inductor reads the config only once per thread.
    patch = config.patch(inductor_choices_class=choices_class) if hasattr(config, "inductor_choices_class") else None
    with V.set_choices_handler(choices_class()):
        if patch is None:
            yield
        else:
            with patch:
                yield
