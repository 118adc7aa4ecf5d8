"""bfloat16 weights in the model, their float32 master copies in the optimizer.

Under bfloat16 autocast every linear layer casts its float32 weight to bfloat16 in the forward pass, and the
backward pass casts the bfloat16 weight gradient back to float32: 12 bytes moved per weight and step that compute
nothing. `MasterWeightAdamW` keeps those weights in bfloat16 in the model, holding the values autocast would have
cast them to (the float32 weights rounded to nearest), and their float32 weights in its state. The forward pass
and the gradients are then the same as with float32 weights under autocast, and so is the AdamW update, which the
optimizer applies to the float32 copy from the bfloat16 gradient before rounding it into the model's weight.

Only weights that autocast runs in bfloat16 may be kept so: `linear_weights(model)` selects the weight matrices of
the `nn.Linear` layers. Everything else (biases, embeddings, normalisation weights, the position grid) stays
float32 and is updated in place, as by `torch.optim.AdamW`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from itertools import chain

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = [
    "MasterWeightAdamW", "adamw_update", "float32_mean_allreduce_hook", "float32_total_norm", "linear_weights",
]

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


def linear_weights(model: nn.Module) -> list[nn.Parameter]:
    """The trainable float32 weight matrices of `model`'s `nn.Linear` layers: what bfloat16 autocast casts to
    bfloat16 at every use, and so what `MasterWeightAdamW` can keep in bfloat16 without changing the model's
    outputs. Biases are left out (autocast casts them too, but they are small and their gradients' sums are
    rounded differently once compiled)."""
    return [
        module.weight
        for module in model.modules()
        if isinstance(module, nn.Linear) and module.weight.requires_grad and module.weight.dtype == torch.float32
    ]


def float32_total_norm(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all `tensors` together, as `torch.nn.utils.get_total_norm`, with every tensor's norm computed
    and kept in float32 whatever its dtype (the torch function returns a bfloat16 tensor's norm rounded to
    bfloat16). A 0-d float32 tensor on the first tensor's device; 0 for no tensors."""
    by_device = defaultdict(list)
    for tensor in tensors:
        by_device[tensor.device].append(tensor)
    if not by_device:
        return torch.zeros(())
    first_device = next(iter(by_device))
    norms = [
        norm.to(first_device)
        for device_tensors in by_device.values()
        for norm in torch._foreach_norm(device_tensors, 2.0, dtype=torch.float32)
    ]
    return torch.linalg.vector_norm(torch.stack(norms))


def float32_mean_allreduce_hook(process_group, bucket):
    """DDP communication hook (`DistributedDataParallel.register_comm_hook(None, hook)`): for a `dist.GradBucket`,
    a `torch.futures.Future` of the mean of its gradients over the processes, summed in float32 and rounded once to
    the bucket's dtype. DDP's own hook would sum bfloat16 gradients in bfloat16; float32 buckets are averaged as by
    DDP's own hook. (No annotations: DDP compares them with its types, which this module's postponed annotations
    are not.)

    With float32 weights under autocast DDP averages the gradients in float32 and keeps the mean in float32; here a
    bfloat16 weight's mean gradient is rounded to bfloat16 before the optimizer reads it: the one difference of
    `MasterWeightAdamW`'s training from the float32 weights' on several processes."""
    group = process_group if process_group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    mean = buffer.to(torch.float32).div_(dist.get_world_size(group))
    future = dist.all_reduce(mean, group=group, async_op=True).get_future()
    return future.then(lambda done: buffer.copy_(done.value()[0]))


def adamw_update(
    masters: list[torch.Tensor],
    copies: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    grad_scale: torch.Tensor | None,
    decay: torch.Tensor,
    step_size: torch.Tensor,
    bias_correction2_sqrt: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """One AdamW step of float32 `masters` in place, the operations of `torch.optim.AdamW`'s multi-tensor path:
    `masters *= decay` (1 - lr * weight decay), moments updated from `grads` (any float dtype, divided by
    `grad_scale` first when given: the clip factor), `masters -= step_size * exp_avg / (sqrt(exp_avg_sq) /
    bias_correction2_sqrt + eps)`. Then `copies[i]` (the model's low-precision weights) gets `masters[i]` rounded
    to its dtype, for the first `len(copies)` masters. The three values that change from step to step are 0-d
    float32 tensors on the masters' device, so that a compiled update is not compiled again for each learning rate
    and step; compiled, the whole step is a few multi-tensor kernels that read each tensor once."""
    grads = [grad.float() for grad in grads]
    if grad_scale is not None:
        grads = torch._foreach_div(grads, grad_scale)
    torch._foreach_mul_(masters, decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denominators, bias_correction2_sqrt)
    torch._foreach_add_(denominators, eps)
    updates = torch._foreach_div(exp_avgs, denominators)
    torch._foreach_mul_(updates, step_size)
    torch._foreach_sub_(masters, updates)
    if copies:
        torch._foreach_copy_(copies, masters[: len(copies)])


def _device_scalar(value: float, device: torch.device) -> torch.Tensor:
    """A 0-d float32 tensor on `device`, filled by a kernel (no copy from the host, so no wait for the GPU)."""
    return torch.full((), value, dtype=torch.float32, device=device)


class MasterWeightAdamW(torch.optim.Optimizer):
    """
    AdamW whose `low_precision` parameters live in the model in `dtype` (bfloat16) while it updates float32
    master copies of them.

    Building it casts each `low_precision` parameter to `dtype` in place (same `nn.Parameter` object, new data) after
    keeping its float32 value as the master, so build it after the model is on its device and before the first
    forward pass (before `torch.compile` traces it). Its update equals `torch.optim.AdamW` on the float32 weights
    given the same gradients, up to float32 rounding: the low-precision gradients are the ones autocast would have
    cast to float32. The clip factor can be applied inside the update (`grad_scale`, as for PyTorch's fused AdamW:
    see `flexvar_hf.training.optim.clip_and_step(fold_clip=True)`); measure the norm with `float32_total_norm`.

    Args:
        params: Parameters or parameter groups (`flexvar_hf.training.optim.parameter_groups`), all float32.
        lr (`float`, defaults to 1e-3), betas (`tuple[float, float]`, defaults to (0.9, 0.999)), eps (`float`,
            defaults to 1e-8), weight_decay (`float`, defaults to 1e-2): as `torch.optim.AdamW`.
        low_precision (iterable of `nn.Parameter`): Parameters among `params` to keep in `dtype` in the model, e.g.
            `linear_weights(model)`.
        dtype (`torch.dtype`, defaults to `torch.bfloat16`): Their dtype in the model; bfloat16 only (float16 would
            need gradient scaling).
        compile (`bool`, *optional*): Run the update through `torch.compile`, which fuses it into a few
            multi-tensor kernels; eagerly it is a sequence of multi-tensor operations. None (the default): compiled
            where the parameters are on CUDA when it steps (so the optimizer can be built before the model moves
            to its device, as accelerate's `prepare` does).

    `master_weights()` lists the float32 weights in parameter-group order and `float32_weights(parameters)` those of
    given parameters (what to evaluate or average: an EMA); `float32_model()` puts copies of them in the model for a
    while (generation, which runs without autocast) and `restore_float32_weights()` for good (the end of training).
    The state dict holds the masters, and `load_state_dict` rounds them back into the model. The masters carry their
    parameter's `requires_grad`, so that code that treats frozen tensors apart (diffusers' `EMAModel.step`) treats
    them as their parameters.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        low_precision: Iterable[nn.Parameter] = (),
        dtype: torch.dtype = torch.bfloat16,
        compile: bool | None = None,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(
                f"lr, eps and weight_decay must be >= 0 and betas in [0, 1), got lr={lr}, eps={eps}, "
                f"weight_decay={weight_decay}, betas={betas}."
            )
        if dtype != torch.bfloat16:
            raise ValueError(f"`dtype` must be torch.bfloat16, got {dtype}.")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        own = {id(param) for param in self._parameters()}
        for param in self._parameters():
            if param.dtype != torch.float32:
                raise TypeError(f"MasterWeightAdamW takes float32 parameters, got one of {param.dtype}.")
        for param in low_precision:
            if id(param) not in own:
                raise ValueError("Every `low_precision` parameter must be one of the optimizer's parameters.")
            if "master" not in self.state[param]:
                self.state[param]["master"] = param.detach().clone().requires_grad_(param.requires_grad)
                param.data = param.data.to(dtype)
        self._compile, self._compiled_update, self._ended = compile, None, False

    def _update_function(self, device: torch.device) -> Callable:
        """`adamw_update`, compiled (once) if `compile` says so for parameters on `device`."""
        if not (self._compile or (self._compile is None and device.type == "cuda")):
            return adamw_update
        if self._compiled_update is None:
            self._compiled_update = torch.compile(adamw_update, fullgraph=True, dynamic=False)
        return self._compiled_update

    def _parameters(self) -> list[nn.Parameter]:
        return [param for group in self.param_groups for param in group["params"]]

    def master_weights(self) -> list[torch.Tensor]:
        """The float32 value of every parameter, in parameter-group order: the master copy of a low-precision one,
        the parameter itself otherwise."""
        return self.float32_weights(self._parameters())

    def float32_weights(self, parameters: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        """The float32 value of each of `parameters` (e.g. `model.parameters()`, in that order): its master copy
        if it is kept in low precision, the parameter itself otherwise."""
        return [self.state[param].get("master", param) if param in self.state else param for param in parameters]

    def _low_precision(self) -> list[nn.Parameter]:
        return [param for param in self._parameters() if "master" in self.state[param]]

    @contextmanager
    def float32_model(self) -> Iterator[None]:
        """Within the block the low-precision parameters hold float32 copies of their masters (the model as float32
        weights would have it, e.g. to generate validation images); after it their low-precision values again.
        Changes to the parameters inside are dropped."""
        low_precision = self._low_precision()
        kept = [param.data for param in low_precision]
        for param in low_precision:
            param.data = self.state[param]["master"].detach().clone()
        try:
            yield
        finally:
            for param, data in zip(low_precision, kept):
                param.data = data

    def restore_float32_weights(self) -> None:
        """Make every low-precision parameter float32 again, holding its master's value (the end of training:
        the model to save or return). The optimizer cannot step afterwards."""
        for param in self._low_precision():
            param.data = self.state.pop(param)["master"].detach()
        self._ended = True

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step of every parameter that has a gradient. A `grad_scale` attribute (0-d float32 tensor),
        when set, divides the gradients first."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._ended:
            raise RuntimeError("restore_float32_weights() ended this optimizer's training; build a new one.")
        grad_scale = getattr(self, "grad_scale", None)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for (device, step), lists in self._step_lists(group).items():
                self._update_function(device)(
                    *lists, grad_scale=None if grad_scale is None else grad_scale.to(device),
                    decay=_device_scalar(1 - group["lr"] * group["weight_decay"], device),
                    step_size=_device_scalar(group["lr"] / (1 - beta1**step), device),
                    bias_correction2_sqrt=_device_scalar(math.sqrt(1 - beta2**step), device),
                    beta1=beta1, beta2=beta2, eps=group["eps"],
                )
        return loss

    def _step_lists(self, group: dict) -> dict[tuple[torch.device, int], tuple[list, ...]]:
        """The group's parameters with gradients, their steps counted, as `adamw_update`'s lists (masters, copies,
        gradients, first and second moments) per device and step count; low-precision parameters come first so
        that `copies[i]` is `masters[i]`'s."""
        lists = defaultdict(lambda: ([], [], [], [], []))
        for param in sorted(
            (param for param in group["params"] if param.grad is not None),
            key=lambda param: "master" not in self.state[param],
        ):
            if param.grad.is_sparse:
                raise TypeError("MasterWeightAdamW does not take sparse gradients.")
            state = self.state[param]
            if "step" not in state:
                state["step"] = 0
                for key in MOMENT_KEYS:
                    state[key] = torch.zeros_like(param, dtype=torch.float32, memory_format=torch.preserve_format)
            state["step"] += 1
            masters, copies, grads, exp_avgs, exp_avg_sqs = lists[param.device, state["step"]]
            if "master" in state:
                masters.append(state["master"])
                copies.append(param)
            else:
                masters.append(param)
            grads.append(param.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
        return lists

    def load_state_dict(self, state_dict: dict) -> None:
        """`torch.optim.Optimizer.load_state_dict`, keeping the master copies and moments in float32 (the base
        class casts floating state to its parameter's dtype) and rounding the masters into the model's weights.
        ValueError for a state without the master of a low-precision parameter (saved by another optimizer: the
        float32 weights are not in it)."""
        saved_ids = list(chain.from_iterable(group["params"] for group in state_dict["param_groups"]))
        for saved_id, param in zip(saved_ids, self._parameters()):
            if "master" in self.state[param] and "master" not in state_dict["state"].get(saved_id, {}):
                raise ValueError(
                    "This optimizer state has no float32 master of a bfloat16 weight: it was saved by another "
                    "optimizer (resume it without bfloat16 weights)."
                )
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for saved_id, param in zip(saved_ids, self._parameters()):
                for key, value in state_dict["state"].get(saved_id, {}).items():
                    if torch.is_tensor(value) and value.is_floating_point():
                        self.state[param][key] = value.to(param.device, torch.float32, copy=True)
                if "master" in self.state[param]:
                    self.state[param]["master"].requires_grad_(param.requires_grad)
                    param.copy_(self.state[param]["master"])
