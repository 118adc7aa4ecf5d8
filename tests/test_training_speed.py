"""Training speed options give the plain path's numbers, and the recipe's defaults are the original trainer's.

The options: the block-causal attention as FlexAttention with a block mask or as one call per scale
(`set_training_attention`), fused AdamW, cached VQ latents (`--cache_latents`); `--torch_compile` is covered by
tests/test_training.py and tests/test_models.py. FlexAttention has no backward pass on the CPU, so its training
steps are compared on the GPU by `benchmarks/bench_train.py --check`; here its forward pass and its block mask.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from flexvar_hf import FlexVARScaleScheduler, FlexVARTransformer2DModel
from flexvar_hf.models import block_causal
from flexvar_hf.models.block_causal import FlexMask, block_causal_mask, flex_block_mask, flex_kernel_options
from flexvar_hf.training.flexvar_loss import build_teacher_inputs, drop_path_factors, flexvar_loss
from flexvar_hf.training.optim import build_optimizer, clip_and_step, flexvar_lr_factor, supports_folded_clip

from conftest import (
    RELATIVE_TOLERANCE,
    GraphCapture,
    first_score_minus_100,
    relative_error,
    with_active_blocks,
)

SPEED_TOLERANCE = 1e-5  # float32 loss of an option against the plain path, relative
PARITY_SCALES = [(1, 1), (2, 2), (3, 3), (4, 4)]


def tiny_model(num_layers: int = 2, **kwargs) -> FlexVARTransformer2DModel:
    torch.manual_seed(0)
    return with_active_blocks(FlexVARTransformer2DModel(
        num_classes=5, vocab_size=32, code_dim=4, num_layers=num_layers, hidden_size=32, num_attention_heads=2,
        pos_grid_size=8, **kwargs,
    ))


def random_schedules(count: int, seed: int = 0, size: int = 128) -> list[list[tuple[int, int]]]:
    generator = torch.Generator().manual_seed(seed)
    scheduler = FlexVARScaleScheduler()
    return [scheduler.sample_training_scales(size, size, generator, keep_final_scale=False) for _ in range(count)]


@pytest.mark.parametrize("block_size", [8, 16, 128])
def test_flex_block_mask_is_the_block_causal_mask(block_size):
    schedules = random_schedules(3) + [[(1, 1), (1, 2), (2, 3), (5, 7)], PARITY_SCALES]
    for scales in schedules:
        length = sum(h * w for h, w in scales)
        expected = block_causal_mask(scales, 0, "cpu")
        block_mask = flex_block_mask(scales, "cpu", block_size=block_size)
        tokens = create_mask(block_mask.mask_mod, None, None, length, length, device="cpu")[0, 0]
        assert torch.equal(tokens, expected)
        # Blocks: a visible pair in every listed block, only visible pairs in every "full" one, none left out.
        padded = torch.zeros(2 * [-(-length // block_size) * block_size], dtype=torch.bool)
        padded[:length, :length] = expected
        blocks = padded.unflatten(0, (-1, block_size)).unflatten(2, (-1, block_size))
        assert torch.equal(block_mask.to_dense()[0, 0].bool(), blocks.any(3).any(1))
        assert torch.equal(block_mask.full_kv_num_blocks[0, 0], blocks.all(3).all(1).sum(1, dtype=torch.int32))


def test_no_kernel_setting_promises_contiguous_blocks():
    """FlexAttention's `BLOCKS_ARE_CONTIGUOUS` lets its kernels step to the next block of each list instead of loading
    its index. It took 8% off a d24 layer's attention on an H100 (benchmarks/RESULTS.md), but our masks break its
    promise: where the length is not a multiple of the block size, the last query block holds padding and is a
    partial block for every key block, so the backward pass's list of partial query blocks of the first key block
    skips the full ones in between, and the backward would walk the wrong blocks. No kernel setting may set it."""
    scales = [(side, side) for side in (1, 2, 3, 6, 8, 9, 10, 13, 16)]  # 680 tokens: 6 blocks, the last padded
    block_mask = flex_block_mask(scales, "cpu")
    count = int(block_mask.q_num_blocks[0, 0, 0])
    partial = block_mask.q_indices[0, 0, 0, :count].tolist()
    full = block_mask.full_q_indices[0, 0, 0, : int(block_mask.full_q_num_blocks[0, 0, 0])].tolist()
    assert partial == [0, 5] and full == [1, 2, 3, 4]
    for options in block_causal.FLEX_KERNEL_OPTIONS.values():
        assert not options.get("BLOCKS_ARE_CONTIGUOUS", False)


def test_flex_kernel_options_follow_the_gpu_and_head_size(monkeypatch):
    """`FLEX_KERNEL_OPTIONS` applies to its compute capability and head size only (a copy each time); elsewhere, on
    the CPU or without a head size, Inductor's defaults (no options)."""
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    hopper = {"BLOCK_M": 64, "BLOCK_N": 128}
    options = flex_kernel_options("cuda:0", 64)
    assert options == hopper
    options["BLOCK_M"] = 16
    assert flex_kernel_options(torch.device("cuda", 0), 64) == hopper
    assert flex_kernel_options("cuda:0", 128) == {} and flex_kernel_options("cuda:0", None) == {}
    assert flex_kernel_options("cpu", 64) == {}
    capability[0] = (8, 0)
    assert flex_kernel_options("cuda:0", 64) == {}


@torch.no_grad()  # FlexAttention has no backward pass on the CPU
def test_flex_attention_runs_with_the_masks_kernel_options(monkeypatch):
    """The transformer asks for its head size's kernel options; they reach every block's FlexAttention call, eager
    and inside a compiled block (one graph, the options on the FlexAttention operator), with the same logits."""
    asked, used, real = [], [], block_causal.flex_attention
    options = {"BLOCK_M": 64, "BLOCK_N": 128}

    def ask(device, head_dim):
        asked.append(head_dim)
        return dict(options)

    def spy(*args, kernel_options=None, **kwargs):
        used.append(kernel_options)
        return real(*args, kernel_options=kernel_options, **kwargs)

    monkeypatch.setattr(block_causal, "flex_kernel_options", ask)
    monkeypatch.setattr(block_causal, "flex_attention", spy)
    scales, labels = [(1, 1), (2, 2), (3, 3)], torch.tensor([0, 2, 4])
    inputs = torch.randn(3, 13, 4, generator=torch.Generator().manual_seed(0))
    model = tiny_model()
    expected = model(labels, scales, inputs).logits
    model.set_training_attention("flex")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention warns that it is not compiled on the CPU
        logits = model(labels, scales, inputs).logits
    assert asked == [16] and used == [options, options]  # hidden size 32 over 2 heads; 2 blocks
    assert relative_error(logits, expected) < 1e-5

    capture = GraphCapture()
    block = model.blocks[0]
    torch._dynamo.reset()
    compiled = torch.compile(block, backend=capture, fullgraph=True)
    hidden = torch.randn(3, 14, 32)
    mask = FlexMask(flex_block_mask(scales, "cpu"), options)
    modulation = block.modulation(torch.randn(3, 32))
    torch.testing.assert_close(compiled(hidden, modulation, mask)[0], block(hidden, modulation, mask)[0])
    handed = [argument for node in capture.graphs[0].graph.nodes if node.op == "call_function"
              and "flex_attention" in str(node.target) for argument in node.args if isinstance(argument, dict)]
    assert len(capture.graphs) == 1 and len(handed) == 1 and handed[0].items() >= options.items()


@torch.no_grad()
def test_training_attentions_give_the_parity_loss(parity_transformer, parity_vq, reference):
    teacher = build_teacher_inputs(parity_vq, PARITY_SCALES, pixels=reference["image"])
    losses = {}
    try:
        for backend in ("sdpa", "flex", "per_scale"):
            parity_transformer.set_training_attention(backend)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # flex_attention warns that it is not compiled on the CPU
                logits = parity_transformer(reference["labels"], PARITY_SCALES, teacher.scale_inputs).logits
            assert relative_error(logits, reference["teacher_logits"]) < RELATIVE_TOLERANCE, backend
            losses[backend] = flexvar_loss(logits, teacher.targets).item()
    finally:
        parity_transformer.set_training_attention("sdpa")
    assert losses["sdpa"] == pytest.approx(reference_loss(reference), rel=RELATIVE_TOLERANCE)
    for backend in ("flex", "per_scale"):
        assert losses[backend] == pytest.approx(losses["sdpa"], rel=SPEED_TOLERANCE), backend
    with pytest.raises(ValueError, match="one of"):
        parity_transformer.set_training_attention("dense")


def test_compiled_loss_gives_the_parity_loss(reference):
    """The compiled cross-entropy (`--torch_compile`) on the original's teacher-forcing logits of the parity fixture
    is the original's loss (cross-entropy over every token, as its trainer takes it) to float32 rounding."""
    logits, targets = reference["teacher_logits"], reference["teacher_targets"]
    original = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    assert flexvar_loss(logits, targets, compiled=True).item() == pytest.approx(original.item(), rel=SPEED_TOLERANCE)
    assert flexvar_loss(logits, targets, compiled=True).item() == pytest.approx(reference_loss(reference), rel=1e-6)


def reference_loss(reference) -> float:
    """Cross-entropy of the original's logits against its targets, per token."""
    return flexvar_loss(reference["teacher_logits"], reference["teacher_targets"]).item()


def train_steps(
    model, schedules, optimizer=None, fused: bool | None = None, fold_clip: bool = False, autocast: bool = False,
    seed: int = 1,
) -> tuple[list[float], list[list[torch.Tensor]]]:
    """An AdamW step (`optimizer`, by default `build_optimizer(model, 1e-2, fused=fused)`) per schedule on random
    teacher-forcing batches, under bfloat16 autocast if `autocast`, the gradients clipped to a norm of 0.05 (below
    theirs); the losses and every step's gradients (float32 copies)."""
    optimizer = optimizer or build_optimizer(model, 1e-2, fused=fused)
    generator = torch.Generator().manual_seed(seed)
    losses, grads = [], []
    for scales in schedules:
        length = sum(h * w for h, w in scales)
        inputs = torch.randn(3, length - 1, 4, generator=generator)
        targets = torch.randint(0, 32, (3, length), generator=generator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = flexvar_loss(model(torch.tensor([0, 2, 5]), scales, inputs).logits, targets)
        loss.backward()
        grads.append([param.grad.to(torch.float32, copy=True) for param in model.parameters()])
        norm = clip_and_step(optimizer, list(model.parameters()), 0.05, fold_clip=fold_clip)
        assert norm > 0.05 and not hasattr(optimizer, "grad_scale")
        losses.append(loss.item())
    return losses, grads


@pytest.mark.parametrize("option", ["per_scale", "fused_adamw", "folded_clip"])
def test_speed_options_train_like_the_plain_path(option):
    """folded_clip: fused AdamW applying the clip factor inside its kernel (`clip_and_step(fold_clip=True)`)."""
    schedules = random_schedules(3, seed=2, size=96)
    plain_losses, (plain_grads, *_) = train_steps(tiny_model(), schedules)
    model = tiny_model()
    if option == "per_scale":
        model.set_training_attention("per_scale")
    losses, (grads, *_) = train_steps(
        model, schedules, fused=option != "per_scale", fold_clip=option == "folded_clip"
    )
    assert losses == pytest.approx(plain_losses, rel=SPEED_TOLERANCE)
    assert losses[0] != losses[-1]  # it trained
    for grad, plain in zip(grads, plain_grads):
        assert relative_error(grad, plain) < SPEED_TOLERANCE


def test_folded_clip_needs_a_fused_adamw():
    model = tiny_model()
    assert supports_folded_clip(build_optimizer(model, 1e-3, fused=True))
    plain = build_optimizer(model, 1e-3)
    assert not supports_folded_clip(plain) and not supports_folded_clip(torch.optim.SGD(model.parameters(), 1e-3))
    with pytest.raises(ValueError, match="fold_clip needs a fused"):
        clip_and_step(plain, model.parameters(), 1.0, fold_clip=True)


def test_sdpa_training_bias_is_the_block_causal_mask_shifted():
    """The "sdpa" training mask is the boolean mask as a bias, with visible scores shifted by `SDPA_SCORE_SHIFT`: the
    same attention and gradients (float32, within 1e-5), every row's logsumexp above 0 even where the first token's
    only score is -100 (what keeps cuDNN's masked backward finite, tests/test_gpu.py), and a bias that follows the
    queries' dtype."""
    scales = [(1, 1), (2, 3), (4, 4)]
    bias = block_causal.training_attention_mask(scales, "sdpa", torch.device("cpu"))
    visible = block_causal_mask(scales, 0, "cpu")
    assert bias.dtype == torch.float32 and torch.equal(bias == block_causal.SDPA_SCORE_SHIFT, visible)
    assert torch.isneginf(bias[~visible]).all()

    generator = torch.Generator().manual_seed(0)
    query, key = first_score_minus_100((2, 3, 23, 8), generator)
    value, grad = (torch.randn(2, 3, 23, 8, generator=generator) for _ in range(2))
    results = {}
    for name, mask in (("boolean", visible), ("shifted", bias)):
        inputs = [tensor.clone().requires_grad_() for tensor in (query, key, value)]
        output = block_causal.block_causal_attention(*inputs, mask)
        output.backward(grad)
        results[name] = [output.detach()] + [tensor.grad for tensor in inputs]
    for expected, got in zip(results["boolean"], results["shifted"]):
        assert relative_error(got, expected) < 1e-5
    scores = query @ key.transpose(-1, -2) + bias
    assert scores.logsumexp(-1).min() > 0 > (query @ key.transpose(-1, -2))[:, :, 0, 0].max() + 88
    low = block_causal.block_causal_attention(*(tensor.bfloat16() for tensor in (query, key, value)), bias)
    assert low.dtype == torch.bfloat16 and relative_error(low.float(), results["boolean"][0]) < 2e-2


def test_sdpa_training_bias_is_built_in_the_dtype_attention_runs_in(monkeypatch):
    """Under autocast SDPA runs in autocast's dtype whatever the queries' (float32 here, as the normalised queries
    of a training step are), so the transformer builds the bias in that dtype: the same values, and no cast left for
    each layer. Without autocast the bias follows the queries."""
    import torch.nn.functional as F

    scales = [(1, 1), (2, 3), (4, 4)]
    query = torch.randn(2, 4, 23, 8)
    assert block_causal.attention_dtype(query) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert block_causal.attention_dtype(query) == torch.bfloat16
    low = block_causal.training_attention_mask(scales, "sdpa", torch.device("cpu"), dtype=torch.bfloat16)
    full = block_causal.training_attention_mask(scales, "sdpa", torch.device("cpu"))
    assert low.dtype == torch.bfloat16 and torch.equal(low.float(), full)

    biases, real = [], F.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kwargs):
        biases.append(attn_mask)
        return real(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = tiny_model().train()
    model.set_training_attention("sdpa")
    inputs = torch.randn(2, 13, model.config.code_dim)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.tensor([0, 1]), [(1, 1), (2, 2), (3, 3)], inputs)
    assert biases and all(bias.dtype == torch.bfloat16 for bias in biases)


def test_per_scale_attention_never_lets_sdpa_take_cudnn(monkeypatch):
    """per_scale's calls run with cuDNN's kernel switched off (the kernel gave NaN gradients and illegal memory
    accesses on these strided prefixes on an H100); the flag is the one SDPA's dispatch reads on CUDA."""
    import torch.nn.functional as F

    from flexvar_hf.models import block_causal

    seen, real = [], F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real(*args, **kwargs)

    scales = [(1, 1), (2, 2), (3, 3)]
    query, key, value = torch.randn(3, 2, 2, 14, 8).unbind(0)
    monkeypatch.setattr(block_causal.F, "scaled_dot_product_attention", spy)
    bounds = block_causal.training_attention_mask(scales, "per_scale", torch.device("cpu"))
    output = block_causal.block_causal_attention(query, key, value, bounds)
    assert seen == [False] * len(scales)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored afterwards
    expected = real(query, key, value, attn_mask=block_causal.block_causal_mask(scales, 0, "cpu"), scale=1.0)
    assert relative_error(output, expected) < 1e-6


# ----------------------------------------------------------------------------------------------------------------
# Stochastic depth (the original's DropPath)


def test_drop_path_factors_rates_and_values():
    factors = drop_path_factors(6, 4000, 0.25, torch.Generator().manual_seed(0))
    assert factors.shape == (6, 2, 4000) and factors.dtype == torch.float32
    assert torch.equal(factors[0], torch.ones(2, 4000))  # the first block's rate is 0
    rates = torch.linspace(0, 0.25, 6)
    for block in range(1, 6):
        keep = 1 - rates[block].item()
        values = factors[block].unique()
        assert torch.allclose(values, torch.tensor([0.0, 1 / keep]))
        assert (factors[block] == 0).float().mean().item() == pytest.approx(1 - keep, abs=0.02)
        assert factors[block].mean().item() == pytest.approx(1.0, abs=0.05)  # expectation kept
    assert drop_path_factors(6, 4, 0.0) is None
    seeded = [drop_path_factors(3, 5, 0.5, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*seeded)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        drop_path_factors(3, 5, 1.0)


@torch.no_grad()
def test_a_dropped_block_is_skipped_for_that_sample():
    model = tiny_model(num_layers=3)
    scales = [(1, 1), (2, 2), (3, 3)]
    inputs, labels = torch.randn(2, 13, 4), torch.tensor([1, 3])
    plain = model(labels, scales, inputs).logits
    assert torch.equal(model(labels, scales, inputs, drop_path_factors=torch.ones(3, 2, 2)).logits, plain)

    factors = torch.ones(3, 2, 2)
    factors[1, :, 0] = 0  # block 1 dropped for sample 0 only
    dropped = model(labels, scales, inputs, drop_path_factors=factors).logits
    skipped = tiny_model(num_layers=3)
    del skipped.blocks[1]
    assert torch.allclose(dropped[0], skipped(labels, scales, inputs).logits[0], atol=1e-6)
    assert torch.equal(dropped[1], plain[1])

    factors[2, 1, 1] = 2.0  # a kept update is scaled by 1 / keep probability: as if its gate were doubled
    scaled = model(labels, scales, inputs, drop_path_factors=factors).logits
    block = model.blocks[2]
    block.norm1.linear.weight.view(6, 32, 32)[5] *= 2
    block.norm1.linear.bias.view(6, 32)[5] *= 2
    assert torch.allclose(scaled[1], model(labels, scales, inputs).logits[1], atol=1e-6)


@torch.no_grad()
def test_drop_path_factors_of_another_batch_or_with_a_cache_are_refused():
    model = tiny_model(num_layers=3)
    scales = [(1, 1), (2, 2)]
    inputs, labels = torch.randn(2, 4, 4), torch.tensor([1, 3])
    # (3, 2, 1) would broadcast one sample's draws over the batch.
    with pytest.raises(ValueError, match=r"shape \(num_layers, 2, batch\) = \(3, 2, 2\), got \(3, 2, 1\)"):
        model(labels, scales, inputs, drop_path_factors=torch.ones(3, 2, 1))
    with pytest.raises(ValueError, match="training only"):
        model(labels, scales[:1], None, kv_cache=model.init_kv_cache(2, 5), drop_path_factors=torch.ones(3, 2, 2))


def test_adaln_gate_initialisation():
    model = tiny_model(num_layers=2)
    std = (1 / 32 / 3) ** 0.5
    for gain in (1e-3, 1e-5):
        model.initialize_weights(adaln_gate_gain=gain)
        rows = model.blocks[1].norm1.linear.weight.view(6, 32, 32)
        for chunk in range(6):
            expected = std * (gain if chunk in (2, 5) else 0.5)
            assert rows[chunk].std().item() == pytest.approx(expected, rel=0.25), (gain, chunk)


# ----------------------------------------------------------------------------------------------------------------
# The training script's recipe defaults


def test_recipe_defaults_are_the_published_commands(train_script):
    args = train_script.parse_args(["--vqvae_model_name_or_path", "vq", "--depth", "16", "--train_data_dir", "x"])
    assert args.scale_lr and args.lr_scheduler == "flexvar" and not args.keep_final_scale
    assert not args.exclude_embeddings_from_weight_decay and args.weight_decay == 0.05
    assert (args.max_grad_norm, args.class_dropout_prob, args.label_smoothing, args.use_ema) == (2.0, 0.1, 0.0, False)
    train_script.fill_recipe_defaults(args, 16)
    assert (args.learning_rate, args.lr_end_fraction, args.init_adaln_gate) == (1e-4, 0.1, 1e-3)
    assert args.drop_path_rate == pytest.approx(0.1 * 16 / 24)
    deep = train_script.parse_args(["--vqvae_model_name_or_path", "vq", "--depth", "24", "--train_data_dir", "x",
                                    "--drop_path_rate", "0"])
    train_script.fill_recipe_defaults(deep, 24)
    assert (deep.learning_rate, deep.lr_end_fraction, deep.init_adaln_gate, deep.drop_path_rate) == (
        8e-5, 0.01, 1e-4, 0.0)
    for flag, value, message in (
        ("--drop_path_rate", "1", r"--drop_path_rate must be in \[0, 1\)"),
        ("--lr_end_fraction", "1.5", r"--lr_end_fraction must be in \[0, 1\]"),
        ("--init_adaln_gate", "0", "--init_adaln_gate must be positive"),
        ("--lr_warmup_steps", "-1", "--lr_warmup_steps must be >= 0"),
    ):
        bad = train_script.parse_args(["--vqvae_model_name_or_path", "vq", "--depth", "16", flag, value])
        with pytest.raises(ValueError, match=message):
            train_script.check_recipe_args(bad)


@pytest.mark.parametrize("num_processes", [1, 2])
def test_flexvar_lr_scheduler_steps_per_optimisation_step(train_script, num_processes):
    args = train_script.parse_args(["--vqvae_model_name_or_path", "vq", "--depth", "1", "--train_data_dir", "x"])
    args.lr_end_fraction = 0.1
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=2.0)
    scheduler = train_script.build_lr_scheduler(args, optimizer, 200 * num_processes, num_processes)
    assert args.lr_warmup_steps == 4  # 1/50 of 200
    rates = []
    for _ in range(200):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        for _ in range(num_processes):  # accelerate steps a prepared scheduler once per process
            scheduler.step()
    assert rates == pytest.approx([2.0 * flexvar_lr_factor(step, 200, 4, 0.1) for step in range(200)])
    assert rates[0] == pytest.approx(0.01) and rates[-1] == pytest.approx(0.2)


@pytest.fixture(scope="module")
def train_script():
    from conftest import load_example

    return load_example("train")


# ----------------------------------------------------------------------------------------------------------------
# --cache_latents


def test_cache_latents_trains_like_encoding_every_step(tmp_path, train_script):
    import numpy as np
    from PIL import Image

    from flexvar_hf import FlexVQModel

    from test_training import TINY_VQ, reset_accelerate

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for index, size in enumerate([(64, 80), (96, 64), (72, 72)]):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / label / f"{index}.png")
    torch.manual_seed(0)
    FlexVQModel(**TINY_VQ).save_pretrained(tmp_path / "vq")

    def run(name, *extra):
        reset_accelerate()
        argv = [
            "--vqvae_model_name_or_path", str(tmp_path / "vq"), "--depth", "1", "--train_data_dir",
            str(tmp_path / "data"), "--resolution", "64", "--train_batch_size", "3", "--max_train_steps", "4",
            "--random_flip", "--seed", "4", "--report_to", "none", "--output_dir", str(tmp_path / name),
            "--no-scale_lr", "--lr_scheduler", "constant", "--learning_rate", "1e-3", *extra,
        ]
        return train_script.main(train_script.parse_args(argv))["losses"]

    plain = run("plain")
    cached = run("cached", "--cache_latents")
    assert cached == pytest.approx(plain, rel=SPEED_TOLERANCE)
    assert plain[0] != plain[-1]
    shard = tmp_path / "cached" / "latent_cache" / "latents-00000-of-00001.safetensors"
    written = shard.stat().st_mtime_ns
    assert run("cached", "--cache_latents", "--max_train_steps", "5")[:4] == cached  # the cache is reused
    assert shard.stat().st_mtime_ns == written
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            run("flex", "--training_attention", "flex")
    with pytest.raises(ValueError, match="centre crops"):
        train_script.check_args(train_script.parse_args([
            "--vqvae_model_name_or_path", str(tmp_path / "vq"), "--depth", "1", "--train_data_dir",
            str(tmp_path / "data"), "--cache_latents", "--random_crop",
        ]))
    reset_accelerate()


# ----------------------------------------------------------------------------------------------------------------
# benchmarks/bench_train.py --e2e on the datasets stand-in (the GPU machine has no `datasets`)


def test_bench_train_e2e_runs_train_py_on_the_datasets_stand_in(tmp_path):
    """The stand-in must offer every part of `datasets` that examples/train.py uses: a train.py that reaches for
    one it lacks fails only on the GPU machine, after its start-up costs have been paid."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    stub = root / "benchmarks" / "datasets_stub"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stub), str(root / "benchmarks"),
                                                        os.environ.get("PYTHONPATH", "")]), "TQDM_DISABLE": "1"}
    probe = subprocess.run([sys.executable, "-c", "import datasets; print(datasets.__file__)"], env=env,
                           capture_output=True, text=True, check=True)
    assert Path(probe.stdout.strip()).is_relative_to(stub)
    result_file = tmp_path / "e2e.json"
    subprocess.run(
        [sys.executable, "-W", "ignore", str(root / "benchmarks" / "bench_train.py"), "--no-steps", "--device", "cpu",
         "--tiny", "--e2e", "--runs", "d16:2", "--configs", "per_scale+fused+cache", "sdpa+bf16weights",
         "--e2e_steps", "4", "--e2e_warmup", "2", "--e2e_checkpointing_steps", "2", "--e2e_images", "30",
         "--e2e_workers", "0", "--e2e_data", str(tmp_path / "jpegs"), "--json", str(result_file)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=True,
    )
    results = json.loads(result_file.read_text())
    assert "failures" not in results, results.get("failures")
    assert [run["mode"] for run in results["runs"]] == ["e2e per_scale+fused+cache", "e2e sdpa+bf16weights"]
    assert all(run["steps"] == 2 and run["tokens_per_s"] > 0 for run in results["runs"])


def test_to_device_copies_to_cuda_from_pinned_memory_without_blocking(monkeypatch):
    """The copies of a training step's CPU-made tensors (draws, block masks) go to CUDA as a non-blocking copy of a
    pinned tensor, which does not make the host wait for the GPU (tests/test_gpu.py runs a step with synchronisation
    forbidden); other moves are plain `Tensor.to`."""
    from flexvar_hf.utils.transfer import to_device

    calls = []

    class Pinned:
        def to(self, device, non_blocking=False):
            calls.append((device, non_blocking))
            return "copied"

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or Pinned())
    values = torch.arange(6.0)
    assert to_device(values, "cuda:0") == "copied"
    assert calls == ["pin", (torch.device("cuda:0"), True)]
    calls.clear()
    assert torch.equal(to_device(values, "cpu"), values) and to_device(values, None) is values
    assert to_device(values, torch.device("meta")).device.type == "meta"
    assert calls == []


@pytest.fixture
def import_benchmark(monkeypatch):
    """Imports benchmarks/NAME.py as a module (they import their neighbours, so the folder goes on the path); what
    it imported from there is dropped from `sys.modules` when the test ends, so that no other test sees the
    benchmarks' module-wide settings."""
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(folder))
    yield __import__
    for path in folder.glob("*.py"):
        sys.modules.pop(path.stem, None)


@pytest.fixture
def bench_train(import_benchmark):
    return import_benchmark("bench_train")


def test_bench_train_defaulttiles_turns_the_librarys_flex_kernel_options_off_and_back_on(bench_train):
    """bench_train's `defaulttiles` experiment empties `FLEX_KERNEL_OPTIONS` for its trainer; the next trainer
    without it gets the library's settings back (the setting is module-wide, as Inductor's configuration)."""
    library = dict(block_causal.FLEX_KERNEL_OPTIONS)
    assert library, "the library names no kernel settings: nothing for the experiment to turn off"
    try:
        for config, expected in (("flex+defaulttiles", {}), ("flex", library)):
            options = bench_train.parse_config(config)
            bench_train.OursTrainer(2, 32, 2, torch.device("cpu"), options, bench_train.TINY_VQ)
            assert block_causal.FLEX_KERNEL_OPTIONS == expected, config
    finally:
        block_causal.FLEX_KERNEL_OPTIONS.update(library)


def test_bench_train_compile_experiments_set_inductor_and_start_from_a_fresh_dynamo_cache(bench_train, monkeypatch):
    """Each trainer of bench_train sets the Inductor settings its config names (`cppwrap`: the C++ wrapper, `combo`:
    combo kernels, off otherwise), compiles its blocks as train.py's `--torch_compile` does (the wide-row backend),
    or in its config's Inductor mode (`graphs`: "reduce-overhead", CUDA graphs), or with Inductor's own heuristics
    (`inductorrows`), and clears Dynamo's cache first, which does not key on Inductor's settings: without that a
    trainer would run the blocks an earlier trainer of the process compiled under other settings."""
    import torch._inductor.config as inductor_config

    from flexvar_hf import FlexVARTransformer2DModel
    from flexvar_hf.utils.inductor import wide_row_inductor

    modes, resets = [], []

    def compile_repeated_blocks(self, **kwargs):
        modes.append(kwargs)

    monkeypatch.setattr(FlexVARTransformer2DModel, "compile_repeated_blocks", compile_repeated_blocks)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(True))
    monkeypatch.setattr(inductor_config, "cpp_wrapper", inductor_config.cpp_wrapper)  # restored afterwards
    monkeypatch.setattr(inductor_config, "combo_kernels", inductor_config.combo_kernels)
    wide_rows, graphs = {"backend": wide_row_inductor}, {"mode": "reduce-overhead"}
    expected = {
        "sdpa+compile+cppwrap": (True, False, wide_rows),
        "sdpa+compile+combo": (False, True, wide_rows),
        "sdpa+compile+graphs": (False, False, graphs),
        "sdpa+compile+inductorrows": (False, False, {}),
        "sdpa+compile": (False, False, wide_rows),
    }
    for config, (cpp_wrapper, combo_kernels, compile_options) in expected.items():
        bench_train.OursTrainer(2, 32, 2, torch.device("cpu"), bench_train.parse_config(config), bench_train.TINY_VQ)
        assert (inductor_config.cpp_wrapper, inductor_config.combo_kernels) == (cpp_wrapper, combo_kernels), config
        assert modes[-1] == {"dynamic": True, **compile_options}, config
    assert len(resets) == len(expected)


def test_bench_train_stack_compiles_all_blocks_as_one_graph_for_every_schedule(bench_train, monkeypatch):
    """bench_train's `stack` experiment compiles `run_blocks` (every block, one graph) instead of each block: the
    losses equal the eager trainer's, no block is compiled on its own, and schedules of other lengths reuse the one
    graph (dynamic shapes: a recompilation per sequence length would cost a long run minutes)."""
    from torch._dynamo.utils import counters

    from flexvar_hf import FlexVARTransformer2DModel

    regional = []
    monkeypatch.setattr(FlexVARTransformer2DModel, "compile_repeated_blocks", lambda self, **kw: regional.append(kw))
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.tensor([1, 7])
    losses, graphs_before = {}, counters["stats"]["unique_graphs"]  # counters are the process's
    for config in ("sdpa", "sdpa+stack"):
        trainer = bench_train.OursTrainer(1, 32, 2, torch.device("cpu"), bench_train.parse_config(config),
                                          bench_train.TINY_VQ)
        losses[config] = []
        for sides in ([1, 2, 3, 4], [1, 3, 4]):
            trainer.step(pixels, labels, sides)
            losses[config].append(trainer.loss.item())
    # The stack of blocks, and the cross-entropy's forward and backward (compiled with the blocks, as train.py does).
    assert counters["stats"]["unique_graphs"] - graphs_before == 3
    assert regional == []
    assert losses["sdpa+stack"] == pytest.approx(losses["sdpa"], rel=1e-3)


def test_bench_train_bf16weights_steps_like_the_fused_adamw(bench_train):
    """bench_train's `bf16weights` experiment trains the bfloat16 linear weights with float32 masters: the same
    losses as `fused` (train.py's fused AdamW with the folded clip), the weights in bfloat16 in the model."""
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.tensor([1, 7])
    losses, trainers = {}, {}
    for config in ("sdpa+fused", "sdpa+bf16weights"):
        trainers[config] = trainer = bench_train.OursTrainer(
            1, 32, 2, torch.device("cpu"), bench_train.parse_config(config), bench_train.TINY_VQ
        )
        losses[config] = []
        for _ in range(3):
            trainer.step(pixels, labels, [1, 2, 4])
            losses[config].append(trainer.loss.item())
    assert losses["sdpa+bf16weights"][0] == losses["sdpa+fused"][0]
    assert losses["sdpa+bf16weights"] == pytest.approx(losses["sdpa+fused"], rel=SPEED_TOLERANCE)
    assert losses["sdpa+fused"][0] != losses["sdpa+fused"][-1]
    assert trainers["sdpa+bf16weights"].transformer.proj_out.weight.dtype == torch.bfloat16


def test_bench_train_rehearse_runs_every_timed_schedule_once_before_timing_it(bench_train):
    """`timed_steps(..., rehearse=True)` runs the timed schedules untimed after the warm-up and then times them,
    so no timed step meets a length the code has not run; without it each schedule runs once."""
    schedules = [[1], [1, 2], [1, 3], [1, 2, 4], [1, 5]]
    for rehearse, expected in ((False, schedules), (True, schedules + schedules[2:])):
        calls = []
        stats = bench_train.timed_steps(calls.append, schedules, 2, 3, torch.device("cpu"), (2, 32), rehearse)
        assert calls == expected
        assert stats["steps"] == 3 and stats["rehearsed"] is rehearse
        assert stats["tokens_per_step"] == 3 * (10 + 21 + 26) / 3


def test_bench_train_profile_sorts_kernels_into_categories(bench_train):
    """`--profile`'s per-step table: each kernel of the names seen in the GPU profiles lands in its category (cuDNN's
    attention and convolutions, and the memory-efficient attention, are not matrix products), per step."""
    kernels = {
        "nvjet_tst_192x192_64x4_1x2_h_bz_coopB_NNT": "matrix products",
        "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x1_tn>": "matrix products",
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": "convolutions",
        "triton_tem_fused_flex_attention_0": "attention forward",
        "triton_tem_fused_flex_attention_backward_1": "attention backward",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64": "attention forward",
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_4_64x128x64": "attention backward",
        "fmha_cutlassB_bf16_aligned_64x64_k64_sm80": "attention backward",
        "flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4>>": "attention forward",
        "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>": "optimizer",
        "Memcpy HtoD (Pinned -> Device)": "copies",
        "triton_red_fused_native_layer_norm_backward_0": "inductor kernels",
        "void at::native::vectorized_layer_norm_kernel<float, float>": "other",
    }
    for name, category in kernels.items():
        assert bench_train.kernel_category(name) == category, name
    timed = [(name, 2000.0) for name in kernels] + [("triton_poi_fused_1", 1000.0)]
    per_step = bench_train.kernel_time_by_category(timed, 2)
    assert per_step["matrix products"] == 2.0 and per_step["inductor kernels"] == 1.5 and per_step["other"] == 1.0
    assert per_step["total"] == len(kernels) + 0.5


def test_bench_train_names_where_the_host_was_while_the_gpu_waited(bench_train):
    """GPU idle time per step, from a Chrome trace: each gap between kernels is charged to the outermost named host
    range around the launch of the kernel that ends it, "outside" any, or "queued early" when that kernel was
    launched before the GPU went idle; short gaps and overlapping kernels are not idle time."""

    def kernel(start, duration, correlation):
        return {"cat": "kernel", "ts": start, "dur": duration, "args": {"correlation": correlation}}

    def launch(time, correlation):
        return {"cat": "cuda_runtime", "ph": "X", "name": "cudaLaunchKernel", "ts": time, "dur": 1,
                "args": {"correlation": correlation}}

    def host(name, start, duration):
        return {"cat": "cpu_op", "ph": "X", "name": name, "ts": start, "dur": duration, "args": {}}

    events = [
        host("Torch-Compiled Region: 0/1", 0, 400), host("CompiledFunction", 10, 300),  # nested: the outer names it
        kernel(0, 100, 1), launch(0, 1),
        kernel(300, 50, 2), launch(290, 2),  # 200 us idle, launched in the compiled region
        kernel(340, 100, 3), launch(100, 3),  # overlaps the previous one: no gap
        kernel(443, 10, 4), launch(420, 4),  # a 3 us gap: too short to count
        kernel(1453, 10, 5), launch(1450, 5),  # 1000 us idle, launched outside any named range
        host("Optimizer.step#AdamW.step", 1500, 100),
        kernel(1563, 10, 6), launch(1550, 6),  # 100 us idle, launched in the optimizer's range
        {"cat": "gpu_memset", "ts": 1973, "dur": 10, "args": {"correlation": 7}}, launch(1560, 7),  # 400 us idle
    ]
    idle = bench_train.gpu_idle_by_host_region(events, steps=2)
    assert idle == pytest.approx({
        "Torch-Compiled Region: 0/1": 0.1, "outside": 0.5, "Optimizer.step": 0.05, "queued early": 0.2, "total": 0.85,
    })


def test_bench_train_profile_counts_device_kernels_once(bench_train):
    """The per-step table sums kernels on the GPU; the optimizer's `record_function` range, which the profiler also
    puts on the GPU's timeline over the optimizer's kernels, and host events are not counted."""
    from types import SimpleNamespace

    events = [
        SimpleNamespace(name="multi_tensor_apply_kernel<FusedAdamMathFunctor>", device_type="cuda",
                        device_time_total=900.0, is_user_annotation=False),
        SimpleNamespace(name="Optimizer.step#AdamW.step", device_type="cuda", device_time_total=1000.0,
                        is_user_annotation=True),
        SimpleNamespace(name="aten::_fused_adamw_", device_type="cpu", device_time_total=900.0,
                        is_user_annotation=False),
    ]
    kernels = bench_train.device_kernels(events, "cuda")
    assert kernels == [("multi_tensor_apply_kernel<FusedAdamMathFunctor>", 900.0)]
    assert bench_train.kernel_time_by_category(kernels, 1)["optimizer"] == 0.9


def test_bench_block_calls_stack_mode_is_the_same_model_in_one_graph(import_benchmark):
    """benchmarks/bench_block_calls.py's `stack` model (`run_blocks` compiled) gives the eager model's gradients for
    schedules of different lengths from one graph; `main` reports each mode it timed."""
    from torch._dynamo.utils import counters

    bench_block_calls = import_benchmark("bench_block_calls")
    cpu = torch.device("cpu")
    eager, stack = bench_block_calls.build("eager", 2, cpu), bench_block_calls.build("stack", 2, cpu)
    graphs_before = counters["stats"]["unique_graphs"]
    for sides in bench_block_calls.SCHEDULES[:2]:
        scales = [(side, side) for side in sides]
        inputs = torch.randn(1, sum(side * side for side in sides) - 1, 8)
        for model in (eager, stack):
            model.zero_grad()
            model(torch.tensor([1]), scales, inputs).logits.square().sum().backward()
        for (name, got), (_, expected) in zip(stack.named_parameters(), eager.named_parameters()):
            torch.testing.assert_close(got.grad, expected.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert counters["stats"]["unique_graphs"] - graphs_before == 1
    results = bench_block_calls.main(
        ["--device", "cpu", "--layers", "1", "--modes", "eager", "--iters", "1", "--repeats", "1"]
    )
    assert [result["mode"] for result in results] == ["eager"] and results[0]["ms_per_forward_backward"] > 0


def test_bench_optimizer_methods_take_the_same_clipped_adamw_steps(import_benchmark, tmp_path):
    """benchmarks/bench_optimizer.py times train.py's fused AdamW with the folded clip against the clipping and a
    multi-tensor AdamW compiled together and against bfloat16 linear weights with float32 masters: after the same
    steps from the same gradients (which the clip at 2.0 scales down) all give the same float32 weights, and the
    report says what it timed."""
    bench_optimizer = import_benchmark("bench_optimizer")
    output = tmp_path / "optimizer.json"
    results = bench_optimizer.main(
        ["--size", "tiny", "--device", "cpu", "--warmup", "1", "--iters", "2", "--json", str(output)]
    )
    assert [result["method"] for result in results] == ["fused", "compiled", "bf16weights"]
    assert results[0]["max_relative_difference"] == 0.0
    for result in results[1:]:  # another order of float32 operations, the same update (of the masters)
        assert 0.0 < result["max_relative_difference"] < 1e-5, result["method"]
    assert all(result["ms_per_step"] > 0 for result in results)
    # 32 bytes a parameter with float32 gradients; bfloat16 gradients save 2 bytes of the linear weights' 32.
    assert results[0]["gb_per_step"] == results[1]["gb_per_step"] == pytest.approx(
        results[0]["parameters_m"] * 32e-3
    )
    assert 30 / 32 < results[2]["gb_per_step"] / results[0]["gb_per_step"] < 31 / 32
    assert json.loads(output.read_text()) == results
