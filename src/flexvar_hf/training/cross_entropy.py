"""Cross-entropy over the 8,912-entry vocabulary that keeps no float32 copy of the logits for the backward pass.

`F.cross_entropy(logits.float(), ...)` saves its float32 log-probabilities for the backward pass and makes two more
float32 tensors of the logits' size there (the gradient of the log-probabilities and of the logits) before casting
back to the logits' dtype. For a d24 step at batch 24 the logits are up to about 20,000 x 8,912 values: each float32
tensor of that size is about 0.7 GB, held at the start of the backward pass, when the step's memory peaks.
`RowCrossEntropy` saves the logits as they are (bfloat16 under autocast) and one float32 log-sum-exp per row, and
works through the rows in chunks, so its float32 temporaries are one chunk in size. The numbers are those of
`F.cross_entropy` on float32 logits, up to float32 rounding.
"""

from __future__ import annotations

import torch

__all__ = ["CHUNK_VALUES", "RowCrossEntropy", "row_cross_entropy"]

# Logit values per chunk of rows (2**25: 128 MiB in float32, 3,765 rows of 8,912 logits).
CHUNK_VALUES = 2**25


def _row_chunks(num_rows: int, vocab_size: int):
    rows = max(1, CHUNK_VALUES // max(vocab_size, 1))
    for start in range(0, num_rows, rows):
        yield slice(start, min(start + rows, num_rows))


class RowCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of (N, V) logits against (N,) targets with label smoothing `eps` (the target
    distribution is `(1 - eps) * onehot + eps / V`), computed in float32 (float64 for float64 logits). Returns (N,)
    losses in that dtype."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
        compute_dtype = torch.promote_types(logits.dtype, torch.float32)
        losses = torch.empty(logits.shape[0], dtype=compute_dtype, device=logits.device)
        log_sum_exp = torch.empty_like(losses)
        for rows in _row_chunks(*logits.shape):
            chunk = logits[rows].to(compute_dtype)
            log_sum_exp[rows] = torch.logsumexp(chunk, dim=-1)
            target_logits = chunk.gather(1, targets[rows, None]).squeeze(1)
            chunk_losses = log_sum_exp[rows] - target_logits
            if label_smoothing:
                uniform_losses = log_sum_exp[rows] - chunk.mean(dim=-1)
                chunk_losses = (1 - label_smoothing) * chunk_losses + label_smoothing * uniform_losses
            losses[rows] = chunk_losses
        ctx.save_for_backward(logits, targets, log_sum_exp)
        ctx.label_smoothing = label_smoothing
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        logits, targets, log_sum_exp = ctx.saved_tensors
        smoothing = ctx.label_smoothing
        grad_logits = torch.empty_like(logits)
        for rows in _row_chunks(*logits.shape):
            # d loss / d logits = softmax - target distribution, per row times the incoming gradient.
            grad = torch.exp(logits[rows].to(log_sum_exp.dtype) - log_sum_exp[rows, None])
            if smoothing:
                grad -= smoothing / logits.shape[1]
            grad.scatter_add_(
                1, targets[rows, None], grad.new_full((grad.shape[0], 1), -(1 - smoothing))
            )
            grad_logits[rows] = grad * grad_losses[rows, None]
        return grad_logits, None, None


def row_cross_entropy(logits: torch.Tensor, targets: torch.LongTensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """(N, V) logits of any float dtype and (N,) targets in [0, V) -> (N,) losses in float32, or float64 for float64
    logits (`RowCrossEntropy`)."""
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"`logits` must be (N, V) and `targets` (N,), got {tuple(logits.shape)} and {tuple(targets.shape)}."
        )
    if not 0 <= label_smoothing <= 1:
        raise ValueError(f"`label_smoothing` must be in [0, 1], got {label_smoothing!r}.")
    return RowCrossEntropy.apply(logits, targets, float(label_smoothing))
