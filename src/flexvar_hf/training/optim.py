"""AdamW for FlexVAR: betas (0.9, 0.95), weight decay 0.05 on weight matrices only."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

# Parameters named like this are never decayed (FlexVAR's start token, position grid and attention temperatures,
# the original's `pos_start`, `pos_1LC` and `scale_mul`), whatever their shape.
NO_DECAY_NAMES = ("start_token", "pos_grid", "log_scale")

NORM_TYPES = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)

__all__ = ["NO_DECAY_NAMES", "build_optimizer", "clip_and_step", "no_decay_parameter_names", "parameter_groups"]


def no_decay_parameter_names(model: nn.Module, extra_names: Iterable[str] = NO_DECAY_NAMES) -> set[str]:
    """Names of the trainable parameters that get no weight decay.

    Biases and every other parameter with fewer than 2 dimensions, the parameters of normalisation layers and
    embedding tables (`nn.Embedding`, e.g. the class embedding), and parameters whose name contains one of
    `extra_names` (by default the start token, the position grid and the attention temperatures).
    """
    extra_names = tuple(extra_names)
    names = set()
    for module_name, module in model.named_modules():
        whole_module = isinstance(module, NORM_TYPES + (nn.Embedding,))
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if not param.requires_grad:
                continue
            if (
                whole_module
                or param.ndim < 2
                or param_name.endswith("bias")
                or any(extra in name for extra in extra_names)
            ):
                names.add(name)
    return names


def parameter_groups(
    model: nn.Module, weight_decay: float, extra_names: Iterable[str] = NO_DECAY_NAMES
) -> list[dict]:
    """Two AdamW parameter groups: `{"params", "weight_decay": weight_decay, "names"}` for weight matrices and
    `{"params", "weight_decay": 0.0, "names"}` for `no_decay_parameter_names`. Frozen parameters are left out; a
    group without parameters is dropped."""
    no_decay = no_decay_parameter_names(model, extra_names)
    decay_group = {"params": [], "names": [], "weight_decay": float(weight_decay)}
    no_decay_group = {"params": [], "names": [], "weight_decay": 0.0}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = no_decay_group if name in no_decay else decay_group
        group["params"].append(param)
        group["names"].append(name)
    return [group for group in (decay_group, no_decay_group) if group["params"]]


def build_optimizer(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over `parameter_groups(model, weight_decay)` (the original's betas and decay by default)."""
    groups = parameter_groups(model, weight_decay)
    return torch.optim.AdamW(groups, lr=learning_rate, betas=tuple(betas), eps=eps, fused=fused)


def clip_and_step(
    optimizer: torch.optim.Optimizer,
    parameters: Iterable[torch.Tensor],
    max_grad_norm: float,
    lr_scheduler=None,
    clip: bool = True,
    clip_grad_norm_: Callable = torch.nn.utils.clip_grad_norm_,
) -> torch.Tensor | None:
    """The second half of a training step, after the backward pass: clip the gradients of `parameters` to
    `max_grad_norm` (<= 0: no clipping, the norm is still measured) when `clip`, then `optimizer.step()`,
    `lr_scheduler.step()` if given and `optimizer.zero_grad(set_to_none=True)`.

    `clip_grad_norm_` is the clipping function (e.g. `accelerator.clip_grad_norm_`, which unscales fp16 gradients
    first); pass `clip=accelerator.sync_gradients` under gradient accumulation. Returns the total gradient norm before
    clipping, or None when `clip` is False.
    """
    grad_norm = None
    if clip:
        grad_norm = clip_grad_norm_(parameters, max_grad_norm if max_grad_norm > 0 else float("inf"))
    optimizer.step()
    if lr_scheduler is not None:
        lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
