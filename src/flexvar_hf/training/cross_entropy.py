"""Cross-entropy over the 8,912-entry vocabulary that keeps no float32 copy of the logits for the backward pass.

`F.cross_entropy(logits.float(), ...)` saves its float32 log-probabilities for the backward pass and makes two more
float32 tensors of the logits' size there (the gradient of the log-probabilities and of the logits) before casting
back to the logits' dtype. For a d24 step at batch 24 the logits are up to about 20,000 x 8,912 values: each float32
tensor of that size is about 0.7 GB, held at the start of the backward pass, when the step's memory peaks.
`RowCrossEntropy` saves the logits as they are (bfloat16 under autocast) and one float32 log-sum-exp per row, and
works through the rows in chunks, so its float32 temporaries are one chunk in size. The numbers are those of
`F.cross_entropy` on float32 logits, up to float32 rounding.

Eagerly each chunk still takes about ten passes over float32 temporaries (the cast, the log-sum-exp's maximum,
difference, exponential and sum, the gradient's terms). `compiled=True` runs the same row functions through
`torch.compile` over all rows at once instead: Inductor fuses each direction into kernels that read the bfloat16
logits once or twice and materialise nothing of their size but the gradient.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

__all__ = ["CHUNK_VALUES", "RowCrossEntropy", "row_cross_entropy"]

# Logit values per chunk of rows (2**25: 128 MiB in float32, 3,765 rows of 8,912 logits).
CHUNK_VALUES = 2**25


def _row_chunks(num_rows: int, vocab_size: int):
    rows = max(1, CHUNK_VALUES // max(vocab_size, 1))
    for start in range(0, num_rows, rows):
        yield slice(start, min(start + rows, num_rows))


def losses_and_log_sum_exp(
    logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, V) logits and (n,) targets -> the (n,) losses and log-sum-exps, in float32 (float64 for float64 logits)."""
    values = logits.to(torch.promote_types(logits.dtype, torch.float32))
    log_sum_exp = torch.logsumexp(values, dim=-1)
    losses = log_sum_exp - values.gather(1, targets[:, None]).squeeze(1)
    if label_smoothing:
        losses = (1 - label_smoothing) * losses + label_smoothing * (log_sum_exp - values.mean(dim=-1))
    return losses, log_sum_exp


def logit_gradients(
    logits: torch.Tensor,
    targets: torch.Tensor,
    log_sum_exp: torch.Tensor,
    grad_losses: torch.Tensor,
    label_smoothing: float,
) -> torch.Tensor:
    """d loss / d logits = (softmax - target distribution) times each row's incoming gradient, in the logits' dtype.
    Eagerly in place on one float32 copy, the target's term a scatter of one value per row; compiled, that term is
    a comparison with the column index instead (the same values), so that Inductor fuses the whole function into
    one kernel rather than writing the float32 gradient out for a scatter."""
    grad = logits.to(log_sum_exp.dtype, copy=True).sub_(log_sum_exp[:, None]).exp_()
    if label_smoothing:
        grad.sub_(label_smoothing / logits.shape[1])
    if torch.compiler.is_compiling():
        is_target = torch.arange(logits.shape[1], device=logits.device) == targets[:, None]
        grad = torch.where(is_target, grad - (1 - label_smoothing), grad)
    else:
        grad.scatter_add_(1, targets[:, None], grad.new_full((grad.shape[0], 1), -(1 - label_smoothing)))
    return grad.mul_(grad_losses[:, None]).to(logits.dtype)


@functools.cache
def _compiled(function: Callable) -> Callable:
    """`function` compiled once for every number of rows (each training schedule has its own)."""
    return torch.compile(function, dynamic=True)


class RowCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of (N, V) logits against (N,) targets with label smoothing `eps` (the target
    distribution is `(1 - eps) * onehot + eps / V`), computed in float32 (float64 for float64 logits), in chunks of
    rows or (`compiled`) compiled over all rows. Returns (N,) losses in that dtype."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float, compiled: bool):
        if compiled:
            losses, log_sum_exp = _compiled(losses_and_log_sum_exp)(logits, targets, label_smoothing)
        else:
            compute_dtype = torch.promote_types(logits.dtype, torch.float32)
            losses = torch.empty(logits.shape[0], dtype=compute_dtype, device=logits.device)
            log_sum_exp = torch.empty_like(losses)
            for rows in _row_chunks(*logits.shape):
                losses[rows], log_sum_exp[rows] = losses_and_log_sum_exp(logits[rows], targets[rows], label_smoothing)
        ctx.save_for_backward(logits, targets, log_sum_exp)
        ctx.label_smoothing, ctx.compiled = label_smoothing, compiled
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        logits, targets, log_sum_exp = ctx.saved_tensors
        smoothing = ctx.label_smoothing
        if ctx.compiled:
            grad_logits = _compiled(logit_gradients)(logits, targets, log_sum_exp, grad_losses, smoothing)
        else:
            grad_logits = torch.empty_like(logits)
            for rows in _row_chunks(*logits.shape):
                grad_logits[rows] = logit_gradients(
                    logits[rows], targets[rows], log_sum_exp[rows], grad_losses[rows], smoothing
                )
        return grad_logits, None, None, None


def row_cross_entropy(
    logits: torch.Tensor, targets: torch.LongTensor, label_smoothing: float = 0.0, compiled: bool = False
) -> torch.Tensor:
    """(N, V) logits of any float dtype and (N,) targets in [0, V) -> (N,) losses in float32, or float64 for float64
    logits (`RowCrossEntropy`). `compiled`: through `torch.compile` (its first call compiles), the same numbers to
    float32 rounding."""
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"`logits` must be (N, V) and `targets` (N,), got {tuple(logits.shape)} and {tuple(targets.shape)}."
        )
    if not 0 <= label_smoothing <= 1:
        raise ValueError(f"`label_smoothing` must be in [0, 1], got {label_smoothing!r}.")
    return RowCrossEntropy.apply(logits, targets, float(label_smoothing), compiled)
