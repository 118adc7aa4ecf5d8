"""AdamW for FlexVAR as the original trainer sets it up: betas (0.9, 0.95), weight decay 0.05 on every parameter of
two or more dimensions except the start token, position grid and attention temperatures, and its learning-rate
schedule ("lin0": warmup, a short hold at the peak, linear decay)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

from flexvar_hf.training.master_weights import MasterWeightAdamW, float32_total_norm, linear_weights

# Parameters named like this are never decayed, whatever their shape: FlexVAR's start token, position grid and
# attention temperatures, the original's `pos_start`, `pos_1LC` and `scale_mul_1H11` (its `nowd_keys` that exist).
NO_DECAY_NAMES = ("start_token", "pos_grid", "log_scale")

# The original's learning-rate schedule (utils/lr_control.py `lr_wd_annealing`, `sche="lin0"`, train.py defaults):
# linear warmup from WARMUP_START of the peak over 1/50 of the iterations (`wp = ep / 50` epochs), then the peak for
# HOLD_FRACTION of the remaining ones, then linear to `end_fraction` of the peak (`--wpe`) at the last one.
FLEXVAR_WARMUP_START = 0.005
FLEXVAR_WARMUP_FRACTION = 1 / 50
FLEXVAR_HOLD_FRACTION = 0.05

__all__ = [
    "NO_DECAY_NAMES",
    "build_optimizer",
    "clip_and_step",
    "flexvar_lr_factor",
    "flexvar_warmup_steps",
    "no_decay_parameter_names",
    "parameter_groups",
    "supports_folded_clip",
]


def no_decay_parameter_names(
    model: nn.Module, extra_names: Iterable[str] = NO_DECAY_NAMES, decay_embeddings: bool = True
) -> set[str]:
    """Names of the trainable parameters that get no weight decay: the original's `filter_params` rule.

    Biases and every other parameter with fewer than 2 dimensions (so also the weights of normalisation layers), and
    parameters whose name contains one of `extra_names` (by default the start token, the position grid and the
    attention temperatures). Embedding tables (`nn.Embedding`: the class embedding) are decayed as in the original,
    unless `decay_embeddings` is False.
    """
    extra_names = tuple(extra_names)
    names = set()
    for module_name, module in model.named_modules():
        spared_module = not decay_embeddings and isinstance(module, nn.Embedding)
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if not param.requires_grad:
                continue
            if (
                spared_module
                or param.ndim < 2
                or param_name.endswith("bias")
                or any(extra in name for extra in extra_names)
            ):
                names.add(name)
    return names


def parameter_groups(
    model: nn.Module, weight_decay: float, extra_names: Iterable[str] = NO_DECAY_NAMES, decay_embeddings: bool = True
) -> list[dict]:
    """Two AdamW parameter groups: `{"params", "weight_decay": weight_decay, "names"}` for the decayed parameters and
    `{"params", "weight_decay": 0.0, "names"}` for `no_decay_parameter_names`. Frozen parameters are left out; a
    group without parameters is dropped."""
    no_decay = no_decay_parameter_names(model, extra_names, decay_embeddings)
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
    decay_embeddings: bool = True,
    bf16_weights: bool = False,
) -> torch.optim.Optimizer:
    """AdamW over `parameter_groups(model, weight_decay, decay_embeddings=decay_embeddings)` (the original's betas
    and decay by default). `fused=True` takes PyTorch's single-kernel AdamW (CUDA; the original's `--afuse`),
    None its default (the multi-tensor "foreach" implementation on CUDA). `bf16_weights=True` instead keeps the
    linear layers' weights in bfloat16 in the model (`master_weights.linear_weights`) with float32 masters in a
    `MasterWeightAdamW`, its update compiled where the model is on CUDA when it steps; for bfloat16 autocast only."""
    groups = parameter_groups(model, weight_decay, decay_embeddings=decay_embeddings)
    if not bf16_weights:
        return torch.optim.AdamW(groups, lr=learning_rate, betas=tuple(betas), eps=eps, fused=fused)
    if fused:
        raise ValueError("bf16_weights takes its own optimizer (MasterWeightAdamW): pass fused=None or False.")
    low_precision = linear_weights(model)
    return MasterWeightAdamW(groups, lr=learning_rate, betas=tuple(betas), eps=eps, low_precision=low_precision)


def flexvar_warmup_steps(total_steps: int) -> int:
    """The original's warmup length for a run of `total_steps`: `round(total_steps / 50)`."""
    return round(total_steps * FLEXVAR_WARMUP_FRACTION)


def flexvar_lr_factor(step: int, total_steps: int, warmup_steps: int, end_fraction: float = 0.01) -> float:
    """
    The learning rate at `step` (0-based) as a fraction of the peak, the original's "lin0" schedule: during the
    `warmup_steps` linear from 0.005 to 1; then, with `progress` = (step - warmup) / (total_steps - 1 - warmup) going
    from 0 to 1, 1 while `progress` < 0.05, then `end_fraction + (1 - end_fraction) * (1 - progress) / 0.95`, down to
    `end_fraction` at the last step (steps past it stay there).
    """
    if step < warmup_steps:
        return FLEXVAR_WARMUP_START + (1 - FLEXVAR_WARMUP_START) * step / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - 1 - warmup_steps, 1), 1.0)
    if progress < FLEXVAR_HOLD_FRACTION:
        return 1.0
    return end_fraction + (1 - end_fraction) * (1 - progress) / (1 - FLEXVAR_HOLD_FRACTION)


def _unwrapped(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer itself: `optimizer`, or the one an accelerate `AcceleratedOptimizer` holds."""
    return getattr(optimizer, "optimizer", optimizer)


def supports_folded_clip(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` (or the optimizer an accelerate wrapper holds) is a fused torch Adam/AdamW, whose update
    kernel can divide the gradients by a `grad_scale` tensor (the hook `torch.amp.GradScaler` uses), or a
    `MasterWeightAdamW`, which takes the same attribute."""
    inner = _unwrapped(optimizer)
    return isinstance(inner, MasterWeightAdamW) or (
        isinstance(inner, torch.optim.Adam | torch.optim.AdamW)
        and getattr(inner, "_step_supports_amp_scaling", False)
        and all(group.get("fused") for group in inner.param_groups)
    )


def _folded_clip_step(optimizer: torch.optim.Optimizer, parameters: Iterable[torch.Tensor], max_grad_norm: float):
    """`clip_grad_norm_` + `optimizer.step()` with the clip factor applied inside the fused update kernel: the
    gradients are divided by max(1, (norm + 1e-6) / max_grad_norm), the reciprocal of `clip_grad_norm_`'s factor,
    instead of being multiplied in a pass of their own. Returns the norm before clipping (in float32, also of
    bfloat16 gradients)."""
    grads = [param.grad for param in parameters if param.grad is not None]
    grad_norm = float32_total_norm(grads)
    inner = _unwrapped(optimizer)
    if max_grad_norm > 0 and grads:
        inner.grad_scale = ((grad_norm + 1e-6) / max_grad_norm).clamp(min=1.0).to(torch.float32)
    try:
        optimizer.step()
    finally:
        inner.__dict__.pop("grad_scale", None)
    return grad_norm


def clip_and_step(
    optimizer: torch.optim.Optimizer,
    parameters: Iterable[torch.Tensor],
    max_grad_norm: float,
    lr_scheduler=None,
    clip: bool = True,
    clip_grad_norm_: Callable = torch.nn.utils.clip_grad_norm_,
    fold_clip: bool = False,
) -> torch.Tensor | None:
    """The second half of a training step, after the backward pass: clip the gradients of `parameters` to
    `max_grad_norm` (<= 0: no clipping, the norm is still measured) when `clip`, then `optimizer.step()`,
    `lr_scheduler.step()` if given and `optimizer.zero_grad(set_to_none=True)`.

    `clip_grad_norm_` is the clipping function (e.g. `accelerator.clip_grad_norm_`, which unscales fp16 gradients
    first); pass `clip=accelerator.sync_gradients` under gradient accumulation. `fold_clip` (a fused AdamW,
    `supports_folded_clip`) measures the norm and lets the optimizer's kernel apply the clip factor, saving a pass
    over the gradients; the updates equal the clipped ones to float32 rounding. It bypasses `clip_grad_norm_`, so
    it is only right where the gradients are whole and unscaled: no GradScaler (fp16), no sharded (FSDP, DeepSpeed)
    gradients. A `MasterWeightAdamW` needs `fold_clip` (clipping its bfloat16 gradients in place would round them).
    Returns the total gradient norm before clipping, or None when `clip` is False.
    """
    grad_norm = None
    if fold_clip and not supports_folded_clip(optimizer):
        raise ValueError(
            "fold_clip needs a fused torch Adam/AdamW (build_optimizer(..., fused=True)) or a MasterWeightAdamW."
        )
    if clip and not fold_clip and isinstance(_unwrapped(optimizer), MasterWeightAdamW):
        raise ValueError("A MasterWeightAdamW applies the clip factor in its update: pass fold_clip=True.")
    if clip and fold_clip:
        grad_norm = _folded_clip_step(optimizer, parameters, max_grad_norm)
    else:
        if clip:
            grad_norm = clip_grad_norm_(parameters, max_grad_norm if max_grad_norm > 0 else float("inf"))
        optimizer.step()
    if lr_scheduler is not None:
        lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
