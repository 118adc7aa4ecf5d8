"""Host-to-GPU copies that do not make the host wait for the GPU."""

from __future__ import annotations

import torch

__all__ = ["to_device"]


def to_device(tensor: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """`tensor.to(device)`, where a CPU tensor bound for a CUDA device is copied from pinned memory without blocking.

    `Tensor.to` from ordinary (pageable) CPU memory synchronises the stream: the host waits until every kernel queued
    so far has run, and the GPU then idles while the host queues the next ones. A training step makes a few such
    copies (random draws from a CPU generator, block masks built on the CPU); each one would stall the step. Pinned
    memory is kept by PyTorch's caching host allocator until the copy has completed, so the result is the same
    tensor, just not waited for. Other moves (and `device` None) are plain `Tensor.to`.
    """
    if device is None:
        return tensor
    device = torch.device(device)
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
