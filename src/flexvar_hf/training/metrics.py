"""Per-step training metrics kept on the device and read back every few steps (`examples/train.py --logging_steps`).

Reading a metric to the host (`.item()`, `.tolist()`, `float(tensor)`) waits for the GPU to finish every queued
kernel; done at every step it leaves the GPU idle while the host prepares the next step (loading the batch, drawing
the scales, the first kernels). `StepMetrics` keeps each step's numbers as device tensors and reads a window of
steps back at once, so a logged run computes the same per-step values with one synchronisation per window.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..utils.transfer import to_device

__all__ = ["StepMetrics"]


@dataclass
class _PendingStep:
    step: int
    lr: float
    num_scales: int
    values: torch.Tensor  # (4,) float32 on the device: loss, token accuracy, last-scale accuracy, gradient norm


class StepMetrics:
    """
    Args:
        device (`torch.device`): Where the running sums live (the training device).

    Per micro-batch call `add_micro_batch`; per optimisation step `end_step`; then `flush` every few steps, on every
    process at the same steps (it reduces across processes), for one `(step, logs)` pair per step since the last
    flush. The logs hold `loss`, `token_accuracy`, `token_accuracy_last_scale` (means over the step's micro-batches
    and the processes), `grad_norm`, `lr`, `num_scales`, and `tokens_per_second` / `images_per_second` over the
    window of steps the flush covers (all processes together).
    """

    def __init__(self, device: torch.device):
        self._sums = torch.zeros(4, device=device)  # loss, accuracy, last-scale accuracy, micro-batches
        # Tokens and images, known on the host from the shapes: a device tensor made from them would be a copy from
        # the host, which synchronises.
        self._counts = [0, 0]
        self._pending: list[_PendingStep] = []
        self._window_start = time.perf_counter()

    def add_micro_batch(
        self, loss: torch.Tensor, accuracy: torch.Tensor, last_accuracy: torch.Tensor, targets: torch.Tensor
    ) -> None:
        """One micro-batch: its 0-d loss and accuracies (in [0, 1]) and its (B, L) target tokens."""
        one = torch.ones((), device=self._sums.device)
        self._sums += torch.stack([loss.detach().float(), accuracy.float(), last_accuracy.float(), one])
        self._counts[0] += targets.numel()
        self._counts[1] += targets.shape[0]

    def end_step(self, step: int, grad_norm: torch.Tensor | float | None, lr: float, num_scales: int) -> None:
        """Close optimisation step `step` (its micro-batches' means), with its gradient norm (None: not measured,
        logged as NaN), learning rate and number of scales."""
        if grad_norm is None:
            grad_norm = float("nan")
        norm = to_device(torch.as_tensor(grad_norm, dtype=torch.float32), self._sums.device).reshape(1)
        values = torch.cat([self._sums[:3] / self._sums[3], norm])
        self._pending.append(_PendingStep(step, lr, num_scales, values))
        self._sums.zero_()

    @property
    def num_pending(self) -> int:
        """Steps closed since the last flush."""
        return len(self._pending)

    def flush(self, reduce: Callable[..., torch.Tensor]) -> list[tuple[int, dict[str, float]]]:
        """`(step, logs)` of every step since the last flush, read back in one transfer. `reduce(tensor,
        reduction=...)` combines a tensor over the processes (`accelerator.reduce`); every process must call this
        at the same steps."""
        if not self._pending:
            return []
        rows = reduce(torch.stack([pending.values for pending in self._pending]), reduction="mean").tolist()
        counts = torch.tensor(self._counts, dtype=torch.float64, device=self._sums.device)
        tokens, images = reduce(counts, reduction="sum").tolist()
        now = time.perf_counter()
        elapsed, self._window_start = max(now - self._window_start, 1e-9), now
        logs = []
        for pending, (loss, accuracy, last_accuracy, grad_norm) in zip(self._pending, rows):
            logs.append((pending.step, {
                "loss": loss,
                "token_accuracy": accuracy,
                "token_accuracy_last_scale": last_accuracy,
                "grad_norm": grad_norm,
                "lr": pending.lr,
                "tokens_per_second": tokens / elapsed,
                "images_per_second": images / elapsed,
                "num_scales": pending.num_scales,
            }))
        self._pending.clear()
        self._counts = [0, 0]
        return logs
