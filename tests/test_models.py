"""FlexVQModel and FlexVARTransformer2DModel against the original code's outputs, and their own invariants."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from flexvar_hf import FlexVARTransformer2DModel, FlexVQModel
from flexvar_hf.models.transformer_flexvar import ResidualUpdate, feed_forward, linear_gelu, modulated_layer_norm
from flexvar_hf.scales import as_hw_list, flatten_grid, resize_codes

from conftest import (
    PIXEL_TOLERANCE,
    RELATIVE_TOLERANCE,
    GraphCapture,
    relative_error,
    requires_cuda,
    with_active_blocks,
)

TRAIN_SCALES = [1, 2, 3, 4]


def tiny_transformer(**overrides) -> FlexVARTransformer2DModel:
    """A small random transformer (3 classes, 16 codes of 4 dims, one layer of width 32, 2 heads) with `overrides`
    of its config."""
    config = dict(num_classes=3, vocab_size=16, code_dim=4, num_layers=1, hidden_size=32, num_attention_heads=2)
    return with_active_blocks(FlexVARTransformer2DModel(**(config | overrides)))


def teacher_inputs_from_indices(vq, indices, scales):
    codes = [vq.indices_to_codes(ix) for ix in indices]
    return torch.cat([flatten_grid(resize_codes(c, (s, s))) for c, s in zip(codes[:-1], scales[1:])], dim=1)


@torch.no_grad()
def test_vq_encode_matches_original(parity_vq, reference):
    latents = parity_vq.encode(reference["image"]).latents
    assert latents.shape == (2, 32, 4, 4)
    assert relative_error(latents, reference["latent"]) < RELATIVE_TOLERANCE


@torch.no_grad()
def test_vq_multiscale_indices_and_codes_match_original(parity_vq, reference):
    indices = parity_vq.quantize_multiscale(reference["latent"], TRAIN_SCALES)
    for i, (side, ix) in enumerate(zip(TRAIN_SCALES, indices)):
        assert ix.shape == (2, side, side) and ix.dtype == torch.long
        assert torch.equal(ix.flatten(1), reference[f"scale_{i}_indices"])
        codes = parity_vq.indices_to_codes(ix)
        assert relative_error(codes, reference[f"scale_{i}_quant"]) < RELATIVE_TOLERANCE
        assert torch.allclose(codes.norm(dim=1), torch.ones(2, side, side), atol=1e-5)


@torch.no_grad()
def test_vq_decode_matches_original(parity_vq, reference):
    indices = reference["scale_3_indices"].view(2, 4, 4)
    pixels = parity_vq.decode_indices(indices).sample
    assert pixels.shape == (2, 3, 64, 64)
    assert (pixels - reference["decoded_from_last_scale"]).abs().max() < PIXEL_TOLERANCE


@torch.no_grad()
def test_teacher_inputs_built_from_tokens_match_fixture(parity_vq, reference):
    indices = [reference[f"scale_{i}_indices"].view(2, s, s) for i, s in enumerate(TRAIN_SCALES)]
    inputs = teacher_inputs_from_indices(parity_vq, indices, TRAIN_SCALES)
    assert relative_error(inputs, reference["teacher_inputs"]) < RELATIVE_TOLERANCE


@torch.no_grad()
def test_teacher_forcing_logits_match_original(parity_transformer, reference, reference_info):
    logits = parity_transformer(reference["labels"], TRAIN_SCALES, reference["teacher_inputs"]).logits
    assert logits.shape == (2, 30, 8912)
    assert relative_error(logits, reference["teacher_logits"]) < RELATIVE_TOLERANCE
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), reference["teacher_targets"].flatten())
    assert loss.item() == pytest.approx(reference_info["teacher_cross_entropy"], rel=1e-4)


@torch.no_grad()
def test_the_tiny_test_models_blocks_carry_the_logits():
    """The random models that the tests compare block paths on (attention backends, caches, kernels, float8) get
    their outputs from their blocks: without the blocks' updates, the logits move by well over bfloat16's rounding."""
    torch.manual_seed(0)
    model = tiny_transformer(num_layers=2, hidden_size=64)
    labels, scales = torch.tensor([0, 1, 2]), [(1, 1), (2, 3), (4, 4)]
    inputs = torch.randn(3, 6 + 16, model.config.code_dim)
    logits = model(labels, scales, inputs).logits
    for block in model.blocks:
        block.attn.to_out.weight.zero_()
        block.ff.net[2].weight.zero_()
    assert relative_error(model(labels, scales, inputs).logits, logits) > 0.1


def incremental_logits(model, labels, scales, inputs):
    cache = model.init_kv_cache(len(labels), sum(h * w for h, w in scales))
    outputs, offset = [], 0
    for i, (h, w) in enumerate(scales):
        chunk = None if i == 0 else inputs[:, offset : offset + h * w]
        offset += 0 if i == 0 else h * w
        outputs.append(model(labels, [(h, w)], chunk, kv_cache=cache).logits)
    assert cache.length == sum(h * w for h, w in scales)
    return torch.cat(outputs, dim=1)


@torch.no_grad()
def test_incremental_path_equals_teacher_forcing_on_fixture(parity_transformer, reference):
    scales = [(s, s) for s in TRAIN_SCALES]
    full = parity_transformer(reference["labels"], scales, reference["teacher_inputs"]).logits
    incremental = incremental_logits(parity_transformer, reference["labels"], scales, reference["teacher_inputs"])
    assert relative_error(incremental, full) < 1e-5


@torch.no_grad()
def test_incremental_path_non_square_scales_beyond_position_grid():
    torch.manual_seed(0)
    model = tiny_transformer(
        num_classes=5, vocab_size=40, code_dim=8, num_layers=2, hidden_size=64, pos_grid_size=4
    ).eval()
    scales = [(1, 2), (2, 3), (3, 5), (6, 8)]  # non-square, and larger than the 4x4 stored grid
    labels = torch.tensor([0, 4, 5])  # 5 is the unconditional label
    inputs = torch.randn(3, sum(h * w for h, w in scales[1:]), 8)
    full = model(labels, scales, inputs).logits
    assert full.shape == (3, 2 + 6 + 15 + 48, 40)
    incremental = incremental_logits(model, labels, scales, inputs)
    assert relative_error(incremental, full) < 1e-5
    # Two scales in one cached call (block-causal inside the call) give the same logits too.
    cache = model.init_kv_cache(3, 71)
    first = model(labels, scales[:2], inputs[:, :6], kv_cache=cache).logits
    rest = model(labels, scales[2:], inputs[:, 6:], kv_cache=cache).logits
    assert relative_error(torch.cat((first, rest), dim=1), full) < 1e-5


RESIZES = [((1, 1), (2, 2)), ((2, 3), (3, 5)), ((13, 13), (16, 16)), ((16, 16), (10, 10)), ((4, 7), (4, 7))]


@pytest.mark.parametrize("source, target", RESIZES)
def test_resize_codes_is_pytorch_bicubic(source, target):
    """The matrix form gives F.interpolate's bicubic numbers (up, down, non-square, edge clamping) in float32 and
    float64, and keeps a bfloat16 map's dtype within bfloat16 rounding."""
    torch.manual_seed(0)
    codes = torch.randn(3, 8, *source)
    expected = torch.nn.functional.interpolate(codes.double(), size=target, mode="bicubic")
    assert (resize_codes(codes, target).double() - expected).abs().max() < 1e-5
    assert (resize_codes(codes.double(), target) - expected).abs().max() < 1e-12
    resized = resize_codes(codes.bfloat16(), target)
    assert resized.dtype == torch.bfloat16
    reference = torch.nn.functional.interpolate(codes.bfloat16().double(), size=target, mode="bicubic")
    assert torch.allclose(resized.double(), reference, rtol=1e-2, atol=1e-2)


@torch.no_grad()
def test_kv_cache_refuses_more_tokens_than_it_holds():
    torch.manual_seed(0)
    model = tiny_transformer(pos_grid_size=4).eval()
    labels = torch.tensor([0, 1])
    cache = model.init_kv_cache(2, 4)
    assert cache.key_values[0].shape == (2, 4, 2, 2, 16)
    model(labels, [(1, 1)], kv_cache=cache)
    with pytest.raises(ValueError, match="holds 4 tokens; this call needs 5"):
        model(labels, [(2, 2)], torch.randn(2, 4, 4), kv_cache=cache)


@torch.no_grad()
def test_block_causal_mask_hides_later_scales():
    torch.manual_seed(0)
    model = tiny_transformer(pos_grid_size=8).eval()
    labels = torch.tensor([1])
    inputs = torch.randn(1, 4 + 9, 4)
    base = model(labels, [1, 2, 3], inputs).logits
    changed = inputs.clone()
    changed[:, 4:] += 1.0  # change only the last scale's inputs
    other = model(labels, [1, 2, 3], changed).logits
    assert torch.allclose(base[:, :5], other[:, :5])  # earlier scales cannot see it
    assert not torch.allclose(base[:, 5:], other[:, 5:])


def test_regionally_compiled_blocks_train_like_eager_ones_for_any_schedule():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    eager = tiny_transformer(num_layers=2, pos_grid_size=8)
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    counters.clear()
    compiled.compile_repeated_blocks(dynamic=True)
    labels = torch.tensor([0, 2, 3])
    graphs = []
    for scales in ([1, 2, 3], [(1, 2), (2, 3), (3, 4), (5, 6)]):  # teacher forcing, a new schedule per step
        inputs = torch.randn(3, sum(h * w for h, w in as_hw_list(scales)[1:]), 4)
        for model in (eager, compiled):
            model.zero_grad()
            model(labels, scales, inputs).logits.square().mean().backward()
        torch.testing.assert_close(compiled(labels, scales, inputs).logits, eager(labels, scales, inputs).logits)
        for (name, got), expected in zip(compiled.named_parameters(), eager.parameters()):
            torch.testing.assert_close(got.grad, expected.grad, msg=name)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1] == graphs[0]  # one dynamic-shape block graph serves every schedule


def test_compiled_block_layer_norms_see_a_static_width():
    """A block compiled with `dynamic=True` normalises over the model's width as a constant: a symbolic width kept
    Inductor from compiling the LayerNorm as a one-pass kernel (runs 13-14 of benchmarks/RESULTS.md)."""
    capture = GraphCapture()
    model = tiny_transformer(num_layers=1)
    block = model.blocks[0]
    torch._dynamo.reset()
    compiled = torch.compile(block, dynamic=True, backend=capture)
    modulation = block.modulation(torch.randn(3, 32))
    for length in (2, 5):  # past the specialisation of sizes 0 and 1
        compiled(torch.randn(3, length, 32), modulation)
    widths = [
        node.kwargs.get("normalized_shape", node.args[1] if len(node.args) > 1 else None)
        for graph_module in capture.graphs
        for node in graph_module.graph.nodes
        if node.op == "call_function" and node.target is torch.nn.functional.layer_norm
    ]
    assert len(widths) == 2 * len(capture.graphs) and all(width == (32,) for width in widths), widths


def test_linear_gelu_is_the_projection_then_gelu():
    """`linear_gelu`'s single op takes the projection's bias and transposed weight, on any leading shape. On the CPU
    `torch._addmm_activation` applies the exact GELU (CUDA: the tanh one, checked by the CUDA test below)."""
    projection = torch.nn.Linear(8, 12)
    hidden_states = torch.randn(2, 5, 8)
    expected = torch.nn.functional.gelu(projection(hidden_states))
    torch.testing.assert_close(linear_gelu(projection, hidden_states), expected)


class LooksLikeCuda(torch.Tensor):
    """A CPU tensor that reports `is_cuda`, to drive `feed_forward`'s choice of path on a machine without a GPU."""

    @property
    def is_cuda(self) -> bool:
        return True


def test_feed_forward_takes_the_fused_op_only_in_cuda_inference(monkeypatch):
    """The fused op (`linear_gelu`) runs exactly for CUDA tensors without autograd or autocast; training (autograd),
    the CPU and autocast take diffusers' module: the fused op has no backward, applies the exact GELU on the CPU
    (so taking it there would change the numbers, as checked here) and is not cast by autocast."""
    from flexvar_hf.models import transformer_flexvar

    block = tiny_transformer(num_layers=1).blocks[0]
    fused_calls = []

    def fused(projection, hidden_states):
        fused_calls.append(type(hidden_states))
        return block.ff.net[0](hidden_states.as_subclass(torch.Tensor))

    monkeypatch.setattr(transformer_flexvar, "linear_gelu", fused)
    cpu = torch.randn(2, 3, 32)
    cuda_like = cpu.clone().as_subclass(LooksLikeCuda)
    with torch.no_grad():
        expected = block.ff(cpu)
        torch.testing.assert_close(feed_forward(block.ff, cuda_like).as_subclass(torch.Tensor), expected)
        assert fused_calls == [LooksLikeCuda]  # CUDA inference: the fused op
        torch.testing.assert_close(feed_forward(block.ff, cpu), expected, rtol=0, atol=0)
        with monkeypatch.context() as patch:
            patch.setattr(torch, "is_autocast_enabled", lambda *args: True)
            feed_forward(block.ff, cuda_like)
    training = cuda_like.clone().requires_grad_(True)
    feed_forward(block.ff, training).square().sum().backward()
    assert training.grad is not None and fused_calls == [LooksLikeCuda]  # CPU, autocast, autograd: the module

    # On the CPU the fused op is the exact GELU and the module the tanh one: the CPU path above is observable.
    monkeypatch.undo()
    with torch.no_grad():
        activation = block.ff.net[0]
        assert (linear_gelu(activation.proj, cpu) - activation(cpu)).abs().max() > 1e-6


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_feed_forward_matches_the_module_on_cuda(dtype):
    block = tiny_transformer(num_layers=1).blocks[0].to("cuda", dtype)
    hidden_states = torch.randn(4, 37, 32, device="cuda", dtype=dtype)
    with torch.no_grad():
        fused, module = feed_forward(block.ff, hidden_states), block.ff(hidden_states)
    # bfloat16: the module rounds the product before the GELU, the epilogue after it.
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(fused, module, **tolerance)
    activation = block.ff.net[0]
    torch.testing.assert_close(linear_gelu(activation.proj, hidden_states), activation(hidden_states), **tolerance)


@pytest.mark.parametrize("guidance_scale", [0.0, 1.0, 3.5])
def test_transformer_guidance_equals_combining_the_logits(guidance_scale):
    """The head of the combined features equals the combination of both rows' logits: the head is linear and the
    weights `1 - g` and `g` sum to one, so its bias carries over."""
    model = tiny_transformer(num_layers=2).eval()
    labels = torch.tensor([0, 2, 3, 3])  # two conditional rows, then their unconditional ones
    scales = [(1, 1), (2, 3)]
    inputs = torch.randn(4, 6, 4)
    with torch.no_grad():
        logits = model(labels, scales, inputs).logits.double()
        guided = model(labels, scales, inputs, guidance_scale=guidance_scale).logits
    cond, uncond = logits.chunk(2)
    expected = uncond + guidance_scale * (cond - uncond)
    assert guided.shape == (2, 7, 16) and guided.dtype == torch.float32
    torch.testing.assert_close(guided.double(), expected, rtol=1e-5, atol=1e-5)


def test_transformer_guidance_needs_stacked_rows():
    model = tiny_transformer()
    with pytest.raises(ValueError, match="odd batch of 3"):
        model(torch.tensor([0, 1, 3]), [1], guidance_scale=2.0)


def test_transformer_rejects_wrong_scale_inputs():
    model = tiny_transformer()
    with pytest.raises(ValueError, match="scale_inputs"):
        model(torch.tensor([0]), [1, 2], torch.randn(1, 3, 4))
    with pytest.raises(ValueError, match="scale"):
        model(torch.tensor([0]), [(1, 2, 3)], None)


@torch.no_grad()
def test_vq_any_size_and_reconstruction_shapes():
    torch.manual_seed(0)
    vq = FlexVQModel(base_channels=32, channel_multipliers=(1, 2, 2), z_channels=16, num_codes=50, code_dim=8).eval()
    assert vq.downsample_factor == 4
    pixels = torch.rand(2, 3, 12, 20) * 2 - 1
    latents = vq.encode(pixels).latents
    assert latents.shape == (2, 8, 3, 5)
    indices = vq.quantize_multiscale(latents, [1, (2, 3), (3, 5)])
    assert [tuple(ix.shape) for ix in indices] == [(2, 1, 1), (2, 2, 3), (2, 3, 5)]
    assert vq.decode_indices(indices[1]).sample.shape == (2, 3, 8, 12)
    assert vq(pixels).sample.shape == pixels.shape
    with pytest.raises(ValueError, match="divisible by 4"):
        vq.encode(torch.zeros(1, 3, 10, 12))


@torch.no_grad()
def test_multiscale_quantisation_in_one_search_equals_one_search_per_scale():
    """`quantize_multiscale` searches every scale's rows at once; each scale must get exactly the indices of
    quantising its area-resized map alone (the rows are independent), for square and non-square scales."""
    torch.manual_seed(0)
    vq = FlexVQModel(
        base_channels=16, channel_multipliers=(1, 2), z_channels=8, num_codes=500, code_dim=32, norm_num_groups=8
    )
    for latents, scales in (
        (torch.randn(6, 32, 16, 16), [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]),
        (torch.randn(3, 32, 9, 14), [1, (2, 3), (3, 5), (6, 9), (9, 14)]),
    ):
        indices = vq.quantize_multiscale(latents, scales)
        for scale, grid in zip(scales, indices):
            size = (scale, scale) if isinstance(scale, int) else scale
            assert torch.equal(grid, vq.quantize(F.interpolate(latents, size=size, mode="area")))


@torch.no_grad()
def test_nearest_code_search_in_bounded_chunks_gives_the_same_indices(monkeypatch):
    """`nearest_codes` searches at most `NEAREST_CODE_ROWS` rows at a time (bounded distance matrices); the
    indices must not depend on where the rows are split."""
    from flexvar_hf.models import vq_model

    torch.manual_seed(0)
    vq = FlexVQModel(
        base_channels=16, channel_multipliers=(1, 2), z_channels=8, num_codes=300, code_dim=8, norm_num_groups=8
    )
    vectors = torch.randn(50, 8)
    whole = vq.quantize.nearest_codes(vectors)
    monkeypatch.setattr(vq_model, "NEAREST_CODE_ROWS", 7)
    assert torch.equal(vq.quantize.nearest_codes(vectors), whole)
    latents = torch.randn(2, 8, 6, 6)
    sizes = [(1, 1), (2, 2), (3, 3), (4, 5), (6, 6)]  # 78 rows per image, split across scales
    for grid, size in zip(vq.quantize_multiscale(latents, sizes), sizes):
        assert torch.equal(grid, vq.quantize(F.interpolate(latents, size=size, mode="area")))


@torch.no_grad()
def test_quantizer_picks_most_similar_code():
    torch.manual_seed(0)
    vq = FlexVQModel(base_channels=32, channel_multipliers=(1, 2), z_channels=8, num_codes=30, code_dim=6)
    latents = torch.randn(3, 6, 2, 2)
    indices = vq.quantize(latents)
    codebook = vq.quantize.normalized_codebook()
    cosine = torch.einsum("bchw,nc->bhwn", torch.nn.functional.normalize(latents, dim=1), codebook)
    assert torch.equal(indices, cosine.argmax(-1))
    # scaling a latent does not change its code (cosine nearest)
    assert torch.equal(vq.quantize(latents * 7.5), indices)


@torch.no_grad()
def test_compiled_cached_block_is_two_graphs_split_at_the_cached_attention():
    """With a cache, a compiled block is one graph up to the cached attention (the previous block's feed-forward
    update and the first LayerNorm with the projection, so that Inductor can fuse the update and what follows the
    norm into its kernel) and one after it (the output projection, the residual and the feed-forward)."""
    model = tiny_transformer(num_layers=2, hidden_size=64).eval()
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append([str(node.target) for node in graph_module.graph.nodes if node.op == "call_function"])
        return graph_module

    for block in model.blocks:
        block.compile(backend=record, dynamic=True)
    labels = torch.tensor([0, 3])
    cache = model.init_kv_cache(2, 1 + 4 + 9)
    for i, side in enumerate((1, 2, 3)):
        model(labels, [(side, side)], None if i == 0 else torch.randn(2, side * side, 4), kv_cache=cache)
    torch._dynamo.reset()
    # Per shape (the 1-token first scale, which Dynamo specialises, then the rest): the first layer's graph before
    # the attention, the graph after it, which both layers share, and the second layer's graph before it, which
    # adds the first layer's update. The later scales share a compilation.
    assert len(graphs) == 6

    def count(graph, name):
        return sum(name in op for op in graph)

    for first_before, after, second_before in zip(graphs[0::3], graphs[1::3], graphs[2::3]):
        for before in (first_before, second_before):
            assert count(before, "layer_norm") == 1 and count(before, "linear") == 1 and count(before, "gelu") == 0
        assert count(second_before, "addcmul") == count(first_before, "addcmul") + 1
        assert count(after, "layer_norm") == 1 and count(after, "gelu") == 1


def test_block_adds_the_previous_update_before_its_first_norm():
    """A block given the previous block's feed-forward update computes what it computes on the updated stream, and
    returns the stream after its attention with its own feed-forward update deferred."""
    block = tiny_transformer(num_layers=1).blocks[0]
    torch.nn.init.normal_(block.norm1.linear.weight, std=0.5)  # gates away from zero, so every update counts
    modulation = block.modulation(torch.randn(2, 32))
    hidden_states, previous = torch.randn(2, 5, 32), ResidualUpdate(torch.randn(2, 1, 32), torch.randn(2, 5, 32))
    with torch.no_grad():
        stream, update = block(hidden_states, modulation, update=previous)
        updated = previous.apply(hidden_states)
        expected_stream, expected_update = block(updated, modulation)
        normed = modulated_layer_norm(block.norm1.norm, updated, *modulation[:2])
        attended = updated + modulation[2] * block.attn(normed)
    torch.testing.assert_close(stream, expected_stream, rtol=0, atol=0)
    torch.testing.assert_close(update.values, expected_update.values, rtol=0, atol=0)
    torch.testing.assert_close(stream, attended)
    assert update.gate is modulation[5]
