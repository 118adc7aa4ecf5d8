"""`generator=[g1, ..., gB]`: one generator per image makes every image independent of the batch it is drawn in, in
the scheduler, the plain and fast loops and the three editing pipelines."""

from __future__ import annotations

import pytest
import torch

from flexvar_hf import (
    FlexVARImg2ImgPipeline,
    FlexVARInpaintPipeline,
    FlexVAROutpaintPipeline,
    FlexVARPipeline,
    FlexVARScaleScheduler,
    FlexVARTransformer2DModel,
    FlexVQModel,
)
from flexvar_hf.schedulers.scheduling_flexvar import check_generator, exponential_noise
from test_image_to_image import derive, random_images

from conftest import with_active_blocks

LABELS = [1, 4, 7, 2]
SEEDS = [11, 12, 13, 14]


def generators(seeds=SEEDS) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def make_micro_pipe() -> FlexVARPipeline:
    """A random pipeline small enough for many calls: 2 pixels per token (so 8x8 pixels are 4x4 tokens)."""
    torch.manual_seed(0)
    transformer = with_active_blocks(FlexVARTransformer2DModel(
        num_classes=10, vocab_size=64, code_dim=8, num_layers=2, hidden_size=64, num_attention_heads=2, pos_grid_size=8
    ))
    vqvae = FlexVQModel(
        base_channels=32, channel_multipliers=(1, 1), layers_per_block=1, z_channels=32, num_codes=64, code_dim=8
    )
    return FlexVARPipeline(transformer.eval(), vqvae.eval(), FlexVARScaleScheduler(vae_scale_factor=2))


@pytest.fixture(scope="module")
def tiny() -> dict:
    return derive(make_micro_pipe())


def test_exponential_noise_draws_each_row_from_its_own_generator():
    batch = exponential_noise((3, 5, 7), generators(SEEDS[:3]), "cpu")
    for row, seed in zip(batch, SEEDS):
        alone = exponential_noise((1, 5, 7), torch.Generator().manual_seed(seed), "cpu")
        assert torch.equal(row, alone[0])
    assert not torch.equal(batch[0], batch[1])
    out = torch.empty(3, 5, 7)
    assert exponential_noise((3, 5, 7), generators(SEEDS[:3]), "cpu", out=out) is out and torch.equal(out, batch)


@pytest.mark.parametrize(
    "generator, error, match",
    [
        (generators()[:3], ValueError, "one generator per image: 4 .* got 3"),
        ([torch.Generator(), 5, torch.Generator(), torch.Generator()], TypeError, "only torch.Generator objects"),
        (7, TypeError, "None, a torch.Generator or a list"),
    ],
)
def test_bad_generator_lists_are_refused(tiny, generator, error, match):
    with pytest.raises(error, match=match):
        check_generator(generator, 4)
    with pytest.raises(error, match=match):
        tiny[FlexVARPipeline](LABELS, height=8, width=8, generator=generator, output_type="latent")


def generate(pipe, labels, seeds, **kwargs) -> torch.Tensor:
    return pipe(labels, generator=generators(seeds), output_type="latent", height=12, width=12, **kwargs).images


def test_batch_with_a_generator_list_equals_each_image_alone(tiny):
    pipe = tiny[FlexVARPipeline]
    batch = generate(pipe, LABELS, SEEDS)
    alone = torch.cat([generate(pipe, [label], [seed]) for label, seed in zip(LABELS, SEEDS)])
    assert torch.equal(batch, alone)
    # Another batch around the same (label, seed) pairs: the same images, in their new places.
    shuffled = generate(pipe, LABELS[::-1] + [3], SEEDS[::-1] + [99])
    assert torch.equal(shuffled[:4].flip(0), batch)
    # Not vacuous: each generator's seed matters.
    assert not torch.equal(generate(pipe, LABELS, [seed + 100 for seed in SEEDS]), batch)


def test_num_images_per_prompt_takes_one_generator_per_output(tiny):
    pipe = tiny[FlexVARPipeline]
    batch = generate(pipe, [1, 4], SEEDS, num_images_per_prompt=2)
    alone = torch.cat([generate(pipe, [label], [seed]) for label, seed in zip([1, 1, 4, 4], SEEDS)])
    assert torch.equal(batch, alone)


def test_fast_sampling_without_cuda_graphs_takes_the_same_generator_list():
    pipe = derive(make_micro_pipe())[FlexVARPipeline]
    plain = generate(pipe, LABELS, SEEDS)
    pipe.enable_fast_sampling(use_cuda_graph=False)
    assert torch.equal(generate(pipe, LABELS, SEEDS), plain)
    assert torch.equal(generate(pipe, LABELS[:1], SEEDS[:1]), plain[:1])
    with pytest.raises(ValueError, match="one generator per image"):
        generate(pipe, LABELS, SEEDS[:2])


def test_editing_pipelines_draw_each_image_from_its_own_generator(tiny):
    images = random_images(batch=2, height=8, width=8, seed=3)  # 4x4 tokens
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:] = 1
    calls = {
        FlexVARImg2ImgPipeline: dict(strength=0.6),
        FlexVARInpaintPipeline: dict(mask_image=mask),
        FlexVAROutpaintPipeline: dict(width=12),
    }
    for cls, kwargs in calls.items():

        def edit(index, seeds, pipe=tiny[cls], kwargs=kwargs):
            return pipe(image=images[index], class_labels=LABELS[:2][index], generator=generators(seeds),
                        output_type="latent", **kwargs).images

        batch = edit(slice(0, 2), SEEDS[:2])
        alone = torch.cat([edit(slice(i, i + 1), SEEDS[i : i + 1]) for i in range(2)])
        assert torch.equal(batch, alone), cls.__name__
        assert not torch.equal(edit(slice(0, 2), SEEDS[2:]), batch), cls.__name__


def test_near_equal_logits_that_swap_rank_get_the_same_draw():
    """The noise follows token ids, not logit ranks: rounding that swaps two near-equal logits (as a batch of
    another size does) changes no draw."""
    scheduler = FlexVARScaleScheduler()
    scheduler.set_timesteps(scales=[2])
    logits = torch.randn(1, 4, 50, generator=torch.Generator().manual_seed(0))
    logits[..., 3] = logits[..., 7] = 4.0  # the two most likely tokens, tied
    first, second = logits.clone(), logits.clone()
    first[..., 3] += 1e-5
    second[..., 7] += 1e-5
    draws = []
    for seed in range(8):
        draw = [scheduler.step(x, 0, top_k=10, generator=torch.Generator().manual_seed(seed)).indices
                for x in (first, second)]
        assert torch.equal(draw[0], draw[1])
        draws.append(draw[0])
    assert {3, 7} <= set(torch.cat(draws).flatten().tolist())  # both tied tokens are drawn
