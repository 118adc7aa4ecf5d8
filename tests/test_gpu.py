"""The GPU suite: the CUDA-only paths that CI (CPU only) cannot run. Every test here skips without CUDA.

Run on a GPU machine with `python -m pytest -q -m gpu` (docs/testing.md), which also runs the Triton kernel tests
(tests/test_kv_cache_kernel.py, tests/test_float8_kernel.py) compiled on CUDA tensors and the fused GELU test of
tests/test_models.py. Covered here: CUDA-graph replay of fast sampling against the plain loop (eager and compiled
blocks), the kernels being compiled rather than interpreted, float8 inference on CUDA, the training attentions'
gradients on CUDA (cuDNN's masked backward kept finite where it gives NaN), training steps that never make the host
wait for the GPU, the gradient clip folded into CUDA's fused AdamW kernel, bfloat16 linear weights with float32
masters and a compiled update, and the compiled cross-entropy.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from flexvar_hf.models.float8 import Float8Linear

from conftest import first_score_minus_100, relative_error, requires_cuda
from test_pipeline import make_tiny_pipe

pytestmark = [pytest.mark.gpu, requires_cuda]

LABELS = [1, 4, 7]
SETTINGS = [
    dict(height=128, width=128),
    dict(height=64, width=128, num_inference_steps=4, guidance_scale=2.0, guidance_schedule="constant"),
    dict(scales=[1, 2, 3, 4], guidance_scale=1.0, top_k=0, top_p=0.0, temperature=0.7),
]


@pytest.fixture
def cuda_pipe(monkeypatch):
    """The tiny random pipeline on CUDA, with float32 products and convolutions in full float32 (no TF32), so that
    paths that choose other kernels (compiled ones) compare closely."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    return make_tiny_pipe().to("cuda")


def generate(pipe, labels=LABELS, seed: int = 0, **kwargs):
    return pipe(labels, generator=torch.Generator("cuda").manual_seed(seed), **kwargs).images


def test_triton_kernels_are_compiled_not_interpreted():
    from triton.runtime.jit import JITFunction

    from flexvar_hf.models import float8_kernel, kv_cache_kernel

    assert os.environ.get("TRITON_INTERPRET") != "1" and not float8_kernel._interpreted()
    kernels = [kv_cache_kernel._normalize_and_cache_kernel, float8_kernel._gelu_quantize_rows_kernel,
               float8_kernel._modulated_layer_norm_quantize_kernel]
    assert all(type(kernel) is JITFunction for kernel in kernels), [type(kernel) for kernel in kernels]


@pytest.mark.parametrize("kwargs", SETTINGS)
def test_cuda_graph_replay_gives_the_plain_loops_tokens_and_pixels(cuda_pipe, kwargs):
    plain = [generate(cuda_pipe, seed=seed, output_type="latent", **kwargs) for seed in (0, 1)]
    pixels = generate(cuda_pipe, output_type="pt", **kwargs)
    assert not torch.equal(plain[0], plain[1])  # sampling is on, so the checks below are not vacuous
    cuda_pipe.enable_fast_sampling()  # CUDA graphs: the default on CUDA
    fast = [generate(cuda_pipe, seed=seed, output_type="latent", **kwargs) for seed in (0, 1)]  # capture, replay
    assert torch.equal(fast[0], plain[0]) and torch.equal(fast[1], plain[1])
    fast_pixels = generate(cuda_pipe, output_type="pt", **kwargs)
    torch.testing.assert_close(fast_pixels, pixels, rtol=0, atol=1e-5)
    loops = cuda_pipe.fast_token_generator.loops
    assert len(loops) == 2 and all(loop.graph is not None for loop in loops.values())  # latent and decoding


def test_a_replayed_graph_samples_for_new_labels(cuda_pipe):
    """Sampling from the 5 best tokens, so that the labels, not only the noise, decide the tokens of this random
    model (its probabilities are nearly uniform)."""
    call = dict(height=64, width=64, top_k=5, seed=3, output_type="latent")
    plain = {labels: generate(cuda_pipe, list(labels), **call) for labels in ((1, 4, 7), (2, 3, 9))}
    assert not torch.equal(*plain.values())
    cuda_pipe.enable_fast_sampling()
    for labels, tokens in plain.items():  # one captured graph, replayed with the second labels
        assert torch.equal(generate(cuda_pipe, list(labels), **call), tokens)
    assert len(cuda_pipe.fast_token_generator.loops) == 1


def test_compiled_blocks_in_the_cuda_graph_give_the_plain_loops_images(cuda_pipe):
    """`torch_compile=True`: compiled blocks and decoder inside the captured graph. Fused float sums may move a logit
    by rounding, so a near tie can flip a token; images whose tokens all agree match the plain path's closely."""
    torch._dynamo.reset()
    settings = [dict(height=128, width=128, top_k=1), dict(height=64, width=128, num_inference_steps=4)]
    plain = [(generate(cuda_pipe, output_type="latent", **s), generate(cuda_pipe, output_type="pt", **s))
             for s in settings]
    cuda_pipe.enable_fast_sampling(torch_compile=True)
    for setting, (tokens, pixels) in zip(settings, plain):
        for _ in range(2):  # capture, then replay
            fast_tokens = generate(cuda_pipe, output_type="latent", **setting)
            fast_pixels = generate(cuda_pipe, output_type="pt", **setting)
            assert (fast_tokens == tokens).float().mean() >= 0.99
            same = [i for i in range(len(LABELS)) if torch.equal(fast_tokens[i], tokens[i])]
            assert same
            torch.testing.assert_close(fast_pixels[same], pixels[same], rtol=0, atol=1e-3)


def needs_float8_units():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 products need compute capability 8.9 or newer (Ada, Hopper)")


@torch.no_grad()
def test_float8_linear_on_cuda_approximates_the_layer():
    needs_float8_units()
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128).to("cuda", torch.bfloat16)
    layer = Float8Linear(linear)
    hidden_states = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    out = layer(hidden_states)
    assert out.dtype == torch.bfloat16 and out.shape == (64, 128) and layer.weight.dtype == torch.float8_e4m3fn
    assert 1e-3 < relative_error(out, linear(hidden_states)) < 0.05  # float8's error, not bfloat16's


def test_float8_inference_on_cuda_with_the_kernels_and_cuda_graphs(cuda_pipe, monkeypatch):
    """A float8 transformer on CUDA takes the fused Triton kernels for its quantisations, moves the bfloat16 model's
    logits by float8's rounding only, and its graph-replayed generation equals its plain loop."""
    needs_float8_units()
    from flexvar_hf.models import float8

    transformer = cuda_pipe.transformer.to(torch.bfloat16)
    torch.manual_seed(0)
    labels, scales = torch.tensor([0, 3, 5], device="cuda"), [(1, 1), (2, 3), (4, 4)]
    inputs = torch.randn(3, 6 + 16, transformer.config.code_dim, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        reference = transformer(labels, scales, inputs).logits.float()
        transformer.enable_float8_inference()
        fused = []
        fuses = float8.fuses
        monkeypatch.setattr(float8, "fuses", lambda values: fused.append(fuses(values)) or fused[-1])
        logits = transformer(labels, scales, inputs).logits.float()
    assert fused and all(fused)  # every quantisation of the feed-forward took a kernel
    assert 1e-3 < relative_error(logits, reference) < 0.05  # float8's error, not bfloat16's
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() > 0.8

    plain = [generate(cuda_pipe, seed=seed, height=128, width=128, output_type="latent") for seed in (0, 1)]
    cuda_pipe.enable_fast_sampling()
    for seed, tokens in enumerate(plain):
        assert torch.equal(generate(cuda_pipe, seed=seed, height=128, width=128, output_type="latent"), tokens)


# Sides of a schedule of 832 tokens: 832 % 128 == 64, the length at which cuDNN's masked backward has failed (pytorch
# issue 196678), with final scales large enough that every attention form runs its real kernels.
TRAINING_SIDES = [1, 2, 3, 4, 5, 6, 8, 14, 15, 16]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_training_attentions_give_finite_equal_gradients_on_cuda(compiled):
    """One teacher-forced step under bfloat16 autocast per training attention, on heads of 64 channels (the released
    models'): finite gradients, equal to the masked "sdpa" step's within bfloat16's noise. "per_scale" gave NaN
    gradients (eager) and an illegal memory access (compiled) on an H100 while SDPA could pick cuDNN. On a GPU with
    an entry in `FLEX_KERNEL_OPTIONS` (Hopper, these 64-wide heads) "flex" runs with those kernel settings."""
    from flexvar_hf import FlexVARTransformer2DModel
    from flexvar_hf.training.flexvar_loss import flexvar_loss

    from conftest import with_active_blocks

    torch.manual_seed(0)
    model = with_active_blocks(FlexVARTransformer2DModel(
        num_classes=5, vocab_size=64, code_dim=4, num_layers=2, hidden_size=128, num_attention_heads=2,
        pos_grid_size=16,
    )).cuda()
    if compiled:
        model.compile_repeated_blocks(dynamic=True)
    scales = [(side, side) for side in TRAINING_SIDES]
    length = sum(side * side for side in TRAINING_SIDES)
    generator = torch.Generator("cuda").manual_seed(1)
    inputs = torch.randn(4, length - 1, 4, generator=generator, device="cuda")
    targets = torch.randint(0, 64, (4, length), generator=generator, device="cuda")
    grads = {}
    for backend in ("sdpa", "flex", "per_scale"):
        model.set_training_attention(backend)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(torch.tensor([0, 2, 4, 1], device="cuda"), scales, inputs).logits
        flexvar_loss(logits, targets).backward()
        grads[backend] = torch.cat([param.grad.flatten().float() for param in model.parameters()])
        assert torch.isfinite(grads[backend]).all(), backend
    for backend in ("flex", "per_scale"):
        assert relative_error(grads[backend], grads["sdpa"]) < 0.02, backend


def test_sdpa_training_bias_keeps_cudnns_masked_backward_finite():
    """pytorch/pytorch issue 196678: with a mask, cuDNN's attention backward (torch >= 2.11, Hopper) gives NaN query
    gradients at lengths L % 128 == 64 when a row's logsumexp is below -88.7, which FlexVAR's first token (it sees
    only itself; scores down to -100) can reach. The "sdpa" training mask shifts the visible scores by
    `SDPA_SCORE_SHIFT`: on cuDNN's kernel its bf16 gradients are finite and as close to the float32 math kernel's
    with the boolean mask as bf16 allows: within 2%, or twice the error of the memory-efficient kernel's bf16
    gradients, whichever is larger. All start from the same bf16-rounded inputs: at scores of +-100 the rounding
    alone moves the float32 query gradient by 2%."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flexvar_hf.models.block_causal import block_causal_attention, block_causal_mask, training_attention_mask

    scales = [(1, 1), (19, 37)]  # 704 tokens: 704 % 128 == 64
    generator = torch.Generator("cuda").manual_seed(0)
    query, key = first_score_minus_100((2, 4, 704, 64), generator, "cuda")
    value, grad = torch.randn_like(key), torch.randn_like(key)

    def gradients(mask, dtype, backend):
        inputs = [tensor.bfloat16().to(dtype).requires_grad_() for tensor in (query, key, value)]
        with sdpa_kernel([backend]):
            block_causal_attention(*inputs, mask).backward(grad.bfloat16().to(dtype))
        return [tensor.grad.float() for tensor in inputs]

    boolean = block_causal_mask(scales, 0, "cuda")
    shifted = gradients(training_attention_mask(scales, "sdpa", torch.device("cuda")), torch.bfloat16,
                        SDPBackend.CUDNN_ATTENTION)
    efficient = gradients(boolean, torch.bfloat16, SDPBackend.EFFICIENT_ATTENTION)
    expected = gradients(boolean, torch.float32, SDPBackend.MATH)
    for name, got, other, reference in zip("qkv", shifted, efficient, expected):
        assert torch.isfinite(got).all(), name
        bound = max(0.02, 2 * relative_error(other, reference))
        assert relative_error(got, reference) < bound, (name, relative_error(other, reference))


@pytest.mark.parametrize("backend, compile_loss", [("sdpa", False), ("flex", False), ("sdpa", True)])
def test_training_step_does_not_wait_for_the_gpu(backend, compile_loss):
    """A warmed-up training step (random draws from a CPU generator, class dropout, stochastic depth, the block mask,
    fused AdamW with the clip factor inside its kernel as train.py runs it, the step's metrics; the cross-entropy
    compiled with dynamic shapes as under `--torch_compile`) queues its kernels without one synchronisation: a copy
    from pageable host memory or a read-back would make the host wait for the GPU, which then idles while the host
    queues the next step's first kernels."""
    from flexvar_hf.training.flexvar_loss import training_loss
    from flexvar_hf.training.metrics import StepMetrics
    from flexvar_hf.training.optim import build_optimizer, clip_and_step

    pipe = make_tiny_pipe()
    transformer, vqvae = pipe.transformer.cuda().train(), pipe.vqvae.cuda()
    transformer.set_training_attention(backend)
    optimizer = build_optimizer(transformer, 1e-4, weight_decay=0.05, betas=(0.9, 0.95), fused=True)
    metrics = StepMetrics(torch.device("cuda"))
    pixels = torch.rand(4, 3, 64, 64, device="cuda") * 2 - 1
    labels = torch.tensor([0, 3, 5, 9], device="cuda")
    generator = torch.Generator().manual_seed(0)

    def step(number, scales):
        output = training_loss(
            transformer, vqvae, scales, pixels, labels, 10, 0.1, generator=generator, drop_path_rate=0.1,
            compile_loss=compile_loss,
        )
        output.loss.backward()
        norm = clip_and_step(optimizer, transformer.parameters(), 2.0, fold_clip=True)
        metrics.add_micro_batch(output.loss, output.loss, output.loss, output.teacher.targets)
        metrics.end_step(number, norm, 1e-4, len(scales))

    schedules = [[1, 2, 3, 4], [1, 2, 4]]
    for number, scales in enumerate(schedules, 1):  # warm-up: compilation, cached resize matrices
        step(number, scales)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for number, scales in enumerate(schedules, 3):
            step(number, scales)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    logs = metrics.flush(lambda tensor, reduction: tensor)
    assert [number for number, _ in logs] == [1, 2, 3, 4]
    assert all(math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"]) for _, values in logs)


def test_folded_clip_gives_the_clipped_update_on_cuda():
    """CUDA's fused AdamW kernel dividing the gradients by `grad_scale` (`clip_and_step(fold_clip=True)`) updates the
    weights as clipping them first does, to float32 rounding, with the clip active."""
    from flexvar_hf.training.optim import build_optimizer, clip_and_step

    def train(fold_clip: bool) -> tuple[list[float], torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).cuda()
        optimizer = build_optimizer(model, 1e-2, fused=True)
        norms = []
        for step in range(4):
            inputs = torch.randn(32, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(step))
            model(inputs).square().sum().backward()
            norms.append(float(clip_and_step(optimizer, list(model.parameters()), 0.1, fold_clip=fold_clip)))
        return norms, torch.cat([param.detach().flatten() for param in model.parameters()])

    norms, weights = train(fold_clip=False)
    folded_norms, folded_weights = train(fold_clip=True)
    assert min(norms) > 0.1  # every step clipped
    assert folded_norms == pytest.approx(norms, rel=1e-5)
    assert relative_error(folded_weights, weights) < 1e-6


def test_bf16_weights_train_like_the_fused_adamw_on_cuda_without_waiting():
    """`build_optimizer(..., bf16_weights=True)` on CUDA (bfloat16 linear weights, float32 masters, the update
    compiled, the clip folded in) under bfloat16 autocast: the first loss and gradients equal the fused AdamW's with
    float32 weights, so the float32 weights after the first step agree to float32 rounding; later losses follow
    (the rounded weights may differ by a unit where the masters do); the model's weights are the masters rounded;
    a warmed-up step queues its kernels without making the host wait for the GPU (the update's learning rate and
    bias corrections change every step without a copy from the host or a recompilation)."""
    from flexvar_hf.training.flexvar_loss import flexvar_loss
    from flexvar_hf.training.optim import build_optimizer, clip_and_step

    def train(bf16_weights: bool) -> tuple[list[float], list[torch.Tensor]]:
        model = make_tiny_pipe().transformer.cuda().train()
        optimizer = build_optimizer(
            model, 1e-3, weight_decay=0.05, betas=(0.9, 0.95), fused=not bf16_weights or None,
            bf16_weights=bf16_weights,
        )
        generator = torch.Generator("cuda").manual_seed(0)
        labels = torch.tensor([0, 3, 5, 9], device="cuda")
        scales, losses = [(1, 1), (2, 2), (4, 4)], []
        for step in range(4):
            if step >= 2:  # warmed up: compiled, state allocated
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                inputs = torch.randn(4, 20, model.config.code_dim, device="cuda", generator=generator)
                targets = torch.randint(0, model.config.vocab_size, (4, 21), device="cuda", generator=generator)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = flexvar_loss(model(labels, scales, inputs).logits, targets)
                loss.backward()
                clip_and_step(optimizer, list(model.parameters()), 1e-3, fold_clip=True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            losses.append(loss.item())
            if step == 0:
                first_weights = [optimizer.state[param].get("master", param).clone() for param in model.parameters()]
        for param in model.parameters():
            if "master" in optimizer.state[param]:
                assert param.dtype == torch.bfloat16
                assert torch.equal(param, optimizer.state[param]["master"].to(torch.bfloat16))
        return losses, first_weights

    losses, weights = train(bf16_weights=False)
    bf16_losses, bf16_weights = train(bf16_weights=True)
    assert bf16_losses[0] == losses[0]
    assert bf16_losses == pytest.approx(losses, rel=1e-4) and losses[0] != losses[-1]
    for mine, fused in zip(bf16_weights, weights):
        assert mine.dtype == torch.float32
        assert relative_error(mine, fused) < 1e-5


def test_compiled_cross_entropy_on_cuda_is_the_chunked_one():
    """`row_cross_entropy(compiled=True)` (Triton kernels) at the released vocabulary over more rows than a chunk,
    with label smoothing: the chunked losses to float32 rounding and the bfloat16 gradients to a unit of their last
    place."""
    from flexvar_hf.training.cross_entropy import row_cross_entropy

    generator = torch.Generator("cuda").manual_seed(0)
    rows, vocab = 6000, 8912
    logits = (torch.randn(rows, vocab, device="cuda", generator=generator) * 3).bfloat16().requires_grad_()
    targets = torch.randint(0, vocab, (rows,), device="cuda", generator=generator)
    upstream = torch.randn(rows, device="cuda", generator=generator)
    results = []
    for compiled in (False, True):
        losses = row_cross_entropy(logits, targets, 0.1, compiled=compiled)
        (losses * upstream).sum().backward()
        results.append((losses.detach(), logits.grad))
        logits.grad = None
    (eager_losses, eager_grad), (losses, grad) = results
    torch.testing.assert_close(losses, eager_losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.float(), eager_grad.float(), rtol=1e-2, atol=1e-8)


def test_wide_row_backend_reduces_d24_layernorm_rows_in_one_pass_forward_and_backward():
    """`wide_row_inductor` (train.py's `--torch_compile`) compiles a d24 block's LayerNorm (rows of 1,536) into
    persistent reductions (`triton_per_` kernels) in the forward and in the backward, which Inductor's own heuristic
    loops over (`triton_red_`); the gradients agree with Inductor's."""
    from torch.profiler import ProfilerActivity, profile

    from flexvar_hf.utils.inductor import wide_row_inductor

    def modulated_norm(x, scale):  # as the blocks' AdaLN: no affine weights, whose gradients are column sums
        return torch.nn.functional.layer_norm(x, (1536,)) * scale

    def reduction_kernels_and_grad(backend):
        torch._dynamo.reset()
        generator = torch.Generator("cuda").manual_seed(0)
        x = torch.randn(4096, 1536, device="cuda", dtype=torch.bfloat16, generator=generator, requires_grad=True)
        grad_output = torch.randn(4096, 1536, device="cuda", dtype=torch.bfloat16, generator=generator)
        scale = torch.linspace(0.5, 1.5, 1536, device="cuda", dtype=torch.bfloat16)
        norm = torch.compile(modulated_norm, backend=backend, dynamic=True)
        norm(x, scale).backward(grad_output)  # compiles both graphs; every reduction is along a row
        x.grad = None
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            norm(x, scale).backward(grad_output)
            torch.cuda.synchronize()
        names = {event.name for event in prof.events() if event.name.startswith(("triton_per", "triton_red"))}
        return {name.split("_fused")[0] for name in names}, x.grad.float()

    wide_kinds, wide_grad = reduction_kernels_and_grad(wide_row_inductor)
    inductor_kinds, inductor_grad = reduction_kernels_and_grad("inductor")
    assert "triton_red" in inductor_kinds
    assert wide_kinds == {"triton_per"}
    torch.testing.assert_close(wide_grad, inductor_grad, rtol=2e-2, atol=2e-2)
