"""bfloat16 linear weights with float32 masters in the optimizer (`build_optimizer(..., bf16_weights=True)`) train
as float32 weights under bfloat16 autocast with train.py's fused AdamW and folded clip: the same forward pass and
gradients, bit for bit, and the same updates up to float32 rounding."""

from __future__ import annotations

import io

import pytest
import torch
import torch._dynamo.utils

from flexvar_hf.training.flexvar_loss import flexvar_loss
from flexvar_hf.training.master_weights import (
    MasterWeightAdamW,
    adamw_update,
    float32_mean_allreduce_hook,
    float32_total_norm,
    linear_weights,
)
from flexvar_hf.training.optim import build_optimizer, clip_and_step, parameter_groups
from test_training_speed import SPEED_TOLERANCE, random_schedules, tiny_model, train_steps


def float32_weights(optimizer) -> list[torch.Tensor]:
    if isinstance(optimizer, MasterWeightAdamW):
        return [weight.detach().clone() for weight in optimizer.master_weights()]
    return [param.detach().clone() for group in optimizer.param_groups for param in group["params"]]


def assert_copies_are_rounded_masters(model, optimizer):
    for param in linear_weights_of(model):
        assert torch.equal(param, optimizer.state[param]["master"].to(torch.bfloat16))


def linear_weights_of(model) -> list[torch.nn.Parameter]:
    return [module.weight for module in model.modules() if isinstance(module, torch.nn.Linear)]


def test_bf16_weights_train_like_float32_weights_under_autocast():
    schedules = random_schedules(4, seed=2, size=96)
    plain_model = tiny_model()
    plain_optimizer = build_optimizer(plain_model, 1e-2, fused=True)
    plain_losses, plain_grads = train_steps(plain_model, schedules, plain_optimizer, fold_clip=True, autocast=True)

    model = tiny_model()
    selected = linear_weights(model)
    optimizer = build_optimizer(model, 1e-2, bf16_weights=True)
    assert {id(param) for param in selected} == {id(param) for param in linear_weights_of(model)}
    assert all(param.dtype == torch.bfloat16 for param in selected)
    others = [param for param in model.parameters() if all(param is not weight for weight in selected)]
    assert others and all(param.dtype == torch.float32 for param in others)
    assert optimizer.param_groups[0]["weight_decay"] == 0.05 and optimizer.param_groups[1]["weight_decay"] == 0.0
    losses, grads = train_steps(model, schedules, optimizer, fold_clip=True, autocast=True)

    assert losses[0] == plain_losses[0]  # the same bfloat16 weights
    for grad, plain in zip(grads[0], plain_grads[0]):  # autocast's float32 gradients are the bfloat16 ones
        assert torch.equal(grad, plain)
    assert losses == pytest.approx(plain_losses, rel=SPEED_TOLERANCE) and losses[0] != losses[-1]
    for master, plain in zip(float32_weights(optimizer), float32_weights(plain_optimizer)):
        assert master.dtype == torch.float32
        assert ((master - plain).abs().max() / plain.abs().max()).item() < SPEED_TOLERANCE
    assert_copies_are_rounded_masters(model, optimizer)
    for param in selected:
        assert optimizer.state[param]["exp_avg"].dtype == torch.float32 and param.grad is None


def test_bf16_weights_keep_the_float32_weights_they_were_built_from():
    """The masters start from the float32 weights, not from their bfloat16 rounding."""
    reference = tiny_model()
    model = tiny_model()
    optimizer = build_optimizer(model, 1e-2, bf16_weights=True)
    for master, weight in zip(optimizer.master_weights(), float32_weights(build_optimizer(reference, 1e-2))):
        assert torch.equal(master, weight)
    assert any(
        not torch.equal(param.float(), optimizer.state[param]["master"]) for param in linear_weights_of(model)
    )


def test_resuming_from_the_state_dict_continues_the_same_run():
    """A checkpoint's model weights (bfloat16) and optimizer state (float32 masters and moments) resume the run:
    two steps, save, a new model and optimizer, load, two steps equal four steps without the interruption."""
    schedules = random_schedules(4, seed=3, size=96)
    model = tiny_model()
    optimizer = build_optimizer(model, 1e-2, bf16_weights=True)
    losses, _ = train_steps(model, schedules, optimizer, fold_clip=True, autocast=True)

    first = tiny_model()
    first_optimizer = build_optimizer(first, 1e-2, bf16_weights=True)
    first_losses, _ = train_steps(first, schedules[:2], first_optimizer, fold_clip=True, autocast=True)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = tiny_model()
    resumed_optimizer = build_optimizer(resumed, 1e-2, bf16_weights=True)
    resumed.load_state_dict(saved["model"])
    with torch.no_grad():  # what the loaded model weights would not restore: the masters' low bits
        for param in linear_weights_of(resumed):
            param.add_(1.0)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    for state in resumed_optimizer.state.values():
        assert all(state[key].dtype == torch.float32 for key in ("exp_avg", "exp_avg_sq"))
    assert_copies_are_rounded_masters(resumed, resumed_optimizer)
    resumed_losses, _ = train_steps(resumed, schedules[2:], resumed_optimizer, fold_clip=True, autocast=True)
    # The batches after the interruption come from a fresh generator: compare with the same batches.
    again = tiny_model()
    again_optimizer = build_optimizer(again, 1e-2, bf16_weights=True)
    train_steps(again, schedules[:2], again_optimizer, fold_clip=True, autocast=True)
    again_losses, _ = train_steps(again, schedules[2:], again_optimizer, fold_clip=True, autocast=True)
    assert first_losses == losses[:2] and resumed_losses == again_losses
    for mine, theirs in zip(resumed_optimizer.master_weights(), again_optimizer.master_weights()):
        assert torch.equal(mine, theirs)


def test_compiled_update_equals_the_eager_one_and_is_compiled_once_per_group():
    """`compile=True`: a new learning rate, step and clip factor at every step reuse the compiled update (one graph
    per parameter group); the masters equal the eager update's to float32 rounding, the copies are their rounding."""
    results = {}
    for compile in (False, True):
        model = tiny_model()
        optimizer = MasterWeightAdamW(
            parameter_groups(model, 0.05), lr=1e-2, betas=(0.9, 0.95), low_precision=linear_weights(model),
            compile=compile,
        )
        generator = torch.Generator().manual_seed(0)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        for step in range(3):
            for param in model.parameters():
                param.grad = torch.randn(param.shape, generator=generator).to(param.dtype)
            for group in optimizer.param_groups:
                group["lr"] = 1e-2 * (step + 1)
            optimizer.grad_scale = torch.tensor(1.5 + step)
            optimizer.step()
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert graphs == (len(optimizer.param_groups) if compile else 0)
        assert_copies_are_rounded_masters(model, optimizer)
        results[compile] = optimizer.master_weights()
    for compiled, eager in zip(results[True], results[False]):
        assert ((compiled - eager).abs().max() / eager.abs().max()).item() < 1e-6
    # By default: compiled for CUDA parameters (where they are when it steps), eager for others.
    optimizer = build_optimizer(tiny_model(), 1e-2, bf16_weights=True)
    assert optimizer._update_function(torch.device("cpu")) is adamw_update
    assert optimizer._update_function(torch.device("cuda")) is not adamw_update


def test_float32_total_norm_keeps_bfloat16_norms_in_float32():
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(300, generator=generator), torch.randn(7, 5, generator=generator).to(torch.bfloat16)]
    norm = float32_total_norm(tensors)
    expected = torch.cat([tensor.double().flatten() for tensor in tensors]).norm()
    assert norm.dtype == torch.float32 and norm.item() == pytest.approx(expected.item(), rel=1e-6)
    assert float32_total_norm(tensors[:1]) == torch.nn.utils.get_total_norm(tensors[:1])
    assert float32_total_norm([]).item() == 0.0


def test_bad_master_weight_arguments_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="torch.bfloat16"):
        MasterWeightAdamW(model.parameters(), low_precision=linear_weights(model), dtype=torch.float16)
    with pytest.raises(ValueError, match="betas"):
        MasterWeightAdamW(model.parameters(), betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="one of the optimizer's parameters"):
        MasterWeightAdamW([model.start_token], low_precision=linear_weights(model))
    with pytest.raises(TypeError, match="float32 parameters"):
        MasterWeightAdamW([torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))])
    with pytest.raises(ValueError, match="fused=None"):
        build_optimizer(model, 1e-3, fused=True, bf16_weights=True)
    optimizer = build_optimizer(model, 1e-3, bf16_weights=True)
    with pytest.raises(ValueError, match="fold_clip=True"):
        clip_and_step(optimizer, model.parameters(), 1.0)


def _mean_of_ranks(rank: int, world_size: int, port: int, values: list[float], results) -> None:
    """One process of `test_float32_mean_allreduce_hook_rounds_the_float32_mean_once`: a bfloat16 weight under DDP
    whose gradient on this rank is `values[rank]` everywhere."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        layer = torch.nn.Linear(4, 1, bias=False).to(torch.bfloat16)
        model = torch.nn.parallel.DistributedDataParallel(layer)
        model.register_comm_hook(None, float32_mean_allreduce_hook)
        inputs = torch.full((1, 4), values[rank], dtype=torch.bfloat16)
        model(inputs).sum().backward()  # the weight's gradient is the input row
        results[rank] = layer.weight.grad.float().tolist()
    finally:
        dist.destroy_process_group()


def test_float32_mean_allreduce_hook_rounds_the_float32_mean_once():
    """Three processes whose bfloat16 gradients lose bits when summed in bfloat16: the hook's mean is the float32
    mean rounded once, the same on every process."""
    import socket

    import torch.multiprocessing as mp

    values = [1.0, 2**-8, 2**-8]  # exact in bfloat16
    expected = torch.tensor(sum(values) / 3).to(torch.bfloat16).item()
    summed = divided = torch.tensor(0.0, dtype=torch.bfloat16)  # bfloat16 sums: of the values, of their thirds
    for value in torch.tensor(values, dtype=torch.bfloat16):
        summed, divided = summed + value, divided + value / 3
    assert expected not in ((summed / 3).item(), divided.item())  # the hook is needed for these values
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_mean_of_ranks, args=(3, port, values, results), nprocs=3, join=True)
    assert [results[rank] for rank in range(3)] == [[[expected] * 4]] * 3


@torch.no_grad()
def test_bf16_weights_give_autocasts_parity_loss(parity_transformer, parity_vq, reference):
    """The converted parity checkpoint with its linear weights in bfloat16 (a copy: `build_optimizer` casts them in
    place) gives bf16 autocast's loss on the fixture's teacher-forcing batch exactly, and that is the original's
    loss (its float32 logits') to bfloat16 noise."""
    import copy

    from flexvar_hf.training.flexvar_loss import build_teacher_inputs

    scales = [(1, 1), (2, 2), (3, 3), (4, 4)]
    teacher = build_teacher_inputs(parity_vq, scales, pixels=reference["image"])
    model = copy.deepcopy(parity_transformer)
    build_optimizer(model, 1e-4, bf16_weights=True)
    losses = []
    for transformer in (parity_transformer, model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = transformer(reference["labels"], scales, teacher.scale_inputs).logits
        losses.append(flexvar_loss(logits, teacher.targets).item())
    assert model.blocks[0].attn.to_qkv.weight.dtype == torch.bfloat16
    assert losses[1] == losses[0]
    original = flexvar_loss(reference["teacher_logits"], reference["teacher_targets"]).item()
    assert losses[1] == pytest.approx(original, rel=2e-3)  # measured 5.8e-4
