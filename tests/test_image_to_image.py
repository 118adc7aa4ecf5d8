"""Image-to-image, in-painting and out-painting: kept tokens are exactly the input's, bad inputs are refused."""

from __future__ import annotations

import numpy as np
import PIL.Image
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
from flexvar_hf.conversion import pipeline_from_original

from conftest import with_active_blocks

PIPELINES = (FlexVARPipeline, FlexVARImg2ImgPipeline, FlexVARInpaintPipeline, FlexVAROutpaintPipeline)


def make_tiny_base(seed: int = 0) -> FlexVARPipeline:
    torch.manual_seed(seed)
    transformer = with_active_blocks(FlexVARTransformer2DModel(
        num_classes=10, vocab_size=64, code_dim=8, num_layers=2, hidden_size=64, num_attention_heads=2, pos_grid_size=8
    ))
    vqvae = FlexVQModel(base_channels=32, z_channels=32, num_codes=64, code_dim=8)
    pipe = FlexVARPipeline(transformer.eval(), vqvae.eval(), FlexVARScaleScheduler())
    return pipe


def derive(base: FlexVARPipeline) -> dict:
    pipes = {cls: cls.from_pipe(base) for cls in PIPELINES[1:]}
    pipes[FlexVARPipeline] = base
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


@pytest.fixture(scope="module")
def parity(transformer_ckpt, vq_ckpt) -> dict:
    return derive(pipeline_from_original(transformer_ckpt, vq_ckpt))


@pytest.fixture(scope="module")
def tiny() -> dict:
    return derive(make_tiny_base())


def random_images(batch: int = 1, height: int = 64, width: int = 64, seed: int = 0) -> torch.Tensor:
    """Images in [0, 1], smooth enough that their tokens vary but are not all alike."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, height // 8, width // 8, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")


def input_tokens(pipe, images: torch.Tensor) -> torch.LongTensor:
    """The input's final-scale tokens, computed here from the VQ model alone."""
    with torch.no_grad():
        latents = pipe.vqvae.encode(images * 2 - 1).latents
        return pipe.vqvae.quantize(latents)


def record_steps(steps: list):
    return lambda pipe, index, timestep, kwargs: steps.append(kwargs["indices"].clone()) or {}


# ----------------------------------------------------------------------------------------------------------------
# In-painting


def test_inpaint_keeps_every_unmasked_final_token(parity):
    pipe = parity[FlexVARInpaintPipeline]
    images = random_images(2)
    masks = torch.zeros(2, 1, 64, 64)
    masks[0, :, 10:40, 20:50] = 1  # tokens rows 0-2, cols 1-3
    masks[1, :, 48:, :17] = 1  # tokens row 3, cols 0-1
    generator = torch.Generator().manual_seed(0)
    tokens = pipe(images, masks, [3, 7], num_images_per_prompt=2, output_type="latent", generator=generator).images
    assert tokens.shape == (4, 4, 4)
    reference = input_tokens(pipe, images).repeat_interleave(2, dim=0)
    regenerate = torch.zeros(4, 4, 4, dtype=torch.bool)
    regenerate[:2, 0:3, 1:4] = True
    regenerate[2:, 3, 0:2] = True
    assert torch.equal(tokens[~regenerate], reference[~regenerate])
    assert not torch.equal(tokens[regenerate], reference[regenerate])  # the masked area was generated


def test_mask_is_reduced_to_every_scale_and_known_tokens_are_merged(parity):
    pipe = parity[FlexVARInpaintPipeline]
    mask = torch.zeros(64, 64)
    mask[:16, :21] = 1  # final tokens (0, 0) and (0, 1), the second by its first 5 columns
    regenerate = pipe.regenerate_mask(pipe.prepare_mask(mask, 1, 64, 64))
    expected_final = torch.zeros(1, 4, 4, dtype=torch.bool)
    expected_final[0, 0, :2] = True
    assert torch.equal(regenerate, expected_final)

    scales = [(1, 1), (2, 2), (3, 3), (4, 4)]
    keep = pipe.keep_masks_for_scales(regenerate, scales, 0.5)
    assert keep[0].all()  # 2 of 16 final tokens regenerated
    assert keep[1].flatten().tolist() == [False, True, True, True]  # 2 of 4: exactly half is "most"
    assert keep[2].flatten().tolist() == [False] + [True] * 8  # pooling windows of 2x2 final tokens, 2 vs 1 of 4
    assert torch.equal(keep[3], ~expected_final)
    assert pipe.keep_masks_for_scales(regenerate, scales, 0.25)[2].flatten().tolist() == [False, False] + [True] * 7

    steps = []
    images = random_images(1, seed=1)
    tokens = pipe(
        images, mask, 5, num_inference_steps=4, output_type="latent", callback_on_step_end=record_steps(steps),
        generator=torch.Generator().manual_seed(1),
    ).images
    assert [tuple(step.shape[1:]) for step in steps] == scales and torch.equal(steps[-1], tokens)
    with torch.no_grad():
        latents = pipe.vqvae.encode(images * 2 - 1).latents
        known = pipe.vqvae.quantize_multiscale(latents * ~regenerate[:, None], scales)
    for step, known_grid, keep_grid in zip(steps, known, keep):
        assert torch.equal(step[keep_grid], known_grid[keep_grid])
    # Zeroing the regenerated latents leaves every kept final token as the plain tokenisation of the input.
    assert torch.equal(known[-1][keep[-1]], input_tokens(pipe, images)[keep[-1]])


def test_mask_formats_and_sizes_agree(tiny):
    pipe = tiny[FlexVARInpaintPipeline]
    mask = np.zeros((64, 64), dtype=bool)
    mask[8:30, 33:60] = True
    pil = PIL.Image.fromarray(mask.astype(np.uint8) * 255)
    variants = [
        pil,
        pil.convert("RGB"),
        [pil],
        mask,
        mask.astype(np.uint8)[..., None] * 255,
        mask.astype(np.float32)[None],
        torch.from_numpy(mask),
        torch.from_numpy(mask).float()[None, None],
    ]
    expected = torch.from_numpy(mask).float()[None, None]
    for variant in variants:
        assert torch.equal(pipe.prepare_mask(variant, 1, 64, 64), expected), type(variant)
    # Any size is resized to the image: a 32x32 mask covers the same tokens.
    small = PIL.Image.fromarray(mask.astype(np.uint8)[::2, ::2] * 255)
    assert torch.equal(
        pipe.regenerate_mask(pipe.prepare_mask(small, 1, 64, 64)), pipe.regenerate_mask(expected)
    )


def test_all_white_mask_and_strength_one_are_plain_generation(tiny):
    kwargs = dict(num_inference_steps=3, output_type="latent")
    generated = tiny[FlexVARPipeline]([1, 2], height=64, width=64, generator=torch.Generator().manual_seed(3),
                                      **kwargs).images
    images = random_images(2)
    white = torch.ones(64, 64)
    inpainted = tiny[FlexVARInpaintPipeline](images, white, [1, 2], generator=torch.Generator().manual_seed(3),
                                             **kwargs).images
    refined = tiny[FlexVARImg2ImgPipeline](images, [1, 2], strength=1.0, generator=torch.Generator().manual_seed(3),
                                           **kwargs).images
    assert torch.equal(inpainted, generated) and torch.equal(refined, generated)


def test_preserve_unmasked_pastes_the_input_back(tiny):
    pipe = tiny[FlexVARInpaintPipeline]
    images = random_images(1, seed=2)
    mask = torch.zeros(64, 64)
    mask[20:44, 20:44] = 1
    kwargs = dict(num_inference_steps=3, output_type="pt")
    plain = pipe(images, mask, 4, generator=torch.Generator().manual_seed(0), **kwargs).images
    kept = pipe(images, mask, 4, preserve_unmasked=True, generator=torch.Generator().manual_seed(0), **kwargs).images
    outside = (mask == 0).expand_as(images)
    assert (kept[outside] - images[outside]).abs().max() < 1e-6
    assert (plain[outside] - images[outside]).abs().max() > 1e-3  # the decoded kept area alone is not the input
    assert torch.equal(kept[~outside], plain[~outside])


# ----------------------------------------------------------------------------------------------------------------
# Image-to-image


def test_strength_zero_is_the_vq_reconstruction_without_the_transformer(parity):
    pipe = parity[FlexVARImg2ImgPipeline]
    images = random_images(1, seed=4)
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda *args: calls.append(1))
    try:
        tokens = pipe(images, 3, strength=0.0, output_type="latent").images
        pixels = pipe(images, 3, strength=0.0, output_type="pt").images
    finally:
        hook.remove()
    assert not calls
    assert torch.equal(tokens, input_tokens(pipe, images))
    with torch.no_grad():
        reconstruction = pipe.vqvae(images * 2 - 1).sample
    assert (pixels - (reconstruction / 2 + 0.5).clamp(0, 1)).abs().max() < 1e-6


@pytest.mark.parametrize(
    "strength, num_scales, kept",
    [(0.0, 10, 10), (1.0, 10, 0), (0.6, 10, 4), (0.3, 10, 7), (0.7, 10, 3), (0.29, 100, 71), (0.05, 10, 10)],
)
def test_kept_scale_rule(strength, num_scales, kept):
    assert FlexVARImg2ImgPipeline.num_kept_scales(strength, num_scales) == kept


def test_strength_keeps_the_first_scales_of_the_input(tiny):
    pipe = tiny[FlexVARImg2ImgPipeline]
    images = random_images(2, seed=5)
    steps, calls = [], []
    hook = pipe.transformer.register_forward_hook(lambda *args: calls.append(1))
    try:
        tokens = pipe(
            images, [0, 9], strength=0.5, num_inference_steps=4, output_type="latent",
            callback_on_step_end=record_steps(steps), generator=torch.Generator().manual_seed(0),
        ).images
    finally:
        hook.remove()
    assert len(calls) == 4  # kept scales still run: later scales attend to them
    with torch.no_grad():
        latents = pipe.vqvae.encode(images * 2 - 1).latents
        known = pipe.vqvae.quantize_multiscale(latents, [1, 2, 3, 4])
    assert torch.equal(steps[0], known[0]) and torch.equal(steps[1], known[1])
    assert not torch.equal(tokens, known[3])


def test_output_size_rule(tiny):
    pipe = tiny[FlexVARImg2ImgPipeline]
    kwargs = dict(strength=0.0, output_type="latent")
    assert pipe(PIL.Image.new("RGB", (50, 70)), 1, **kwargs).images.shape == (1, 4, 3)  # 70x50 -> 64x48
    assert pipe(PIL.Image.new("L", (72, 72)), 1, **kwargs).images.shape == (1, 5, 5)  # halves up: 72 -> 80
    assert pipe(np.zeros((48, 64, 3)), 1, round_to_multiple=False, **kwargs).images.shape == (1, 3, 4)
    assert pipe(random_images(1), 1, height=32, width=64, **kwargs).images.shape == (1, 2, 4)
    images = pipe(PIL.Image.new("RGB", (50, 70)), [1, 2], num_inference_steps=2, output_type="pil").images
    assert len(images) == 2 and images[0].size == (48, 64)


# ----------------------------------------------------------------------------------------------------------------
# Out-painting


@pytest.mark.parametrize(
    "height, width, offset, rows, cols",
    [(64, 128, None, slice(0, 4), slice(2, 6)), (128, 128, None, slice(2, 6), slice(2, 6)),
     (128, 96, (64, 32), slice(4, 8), slice(2, 6))],
)
def test_outpaint_keeps_the_input_tokens_at_their_new_position(parity, height, width, offset, rows, cols):
    pipe = parity[FlexVAROutpaintPipeline]
    images = random_images(1, seed=6)
    pixels = pipe(
        images, 3, height=height, width=width, offset=offset, output_type="pt", preserve_unmasked=True,
        callback_on_step_end=record_steps(steps := []), generator=torch.Generator().manual_seed(0),
    ).images
    tokens = steps[-1]
    assert tokens.shape == (1, height // 16, width // 16) and pixels.shape == (1, 3, height, width)
    reference = input_tokens(pipe, images)
    assert torch.equal(tokens[:, rows, cols], reference)
    outside = torch.ones_like(tokens, dtype=torch.bool)
    outside[:, rows, cols] = False
    assert (tokens[outside] != 0).any()  # the new area was generated, not left at the zero latents' token
    pixel_rows, pixel_cols = slice(rows.start * 16, rows.stop * 16), slice(cols.start * 16, cols.stop * 16)
    assert (pixels[:, :, pixel_rows, pixel_cols] - images).abs().max() < 1e-6


# ----------------------------------------------------------------------------------------------------------------
# Shared components


def test_from_pipe_shares_the_same_module_objects(tiny):
    base = tiny[FlexVARPipeline]
    for cls in PIPELINES:
        for source in tiny.values():
            pipe = cls.from_pipe(source)
            assert type(pipe) is cls
            assert pipe.transformer is base.transformer and pipe.vqvae is base.vqvae
            assert pipe.scheduler is base.scheduler and pipe.id2label == base.id2label
    half = make_tiny_base(1).to(torch.bfloat16)
    inpaint = FlexVARInpaintPipeline.from_pipe(half)
    assert inpaint.transformer is half.transformer and inpaint.transformer.dtype == torch.bfloat16


def test_known_tokens_are_checked(tiny):
    pipe = tiny[FlexVARPipeline]
    pipe.scheduler.set_timesteps(2, height=32, width=32)
    labels = torch.tensor([1])
    with pytest.raises(ValueError, match="one entry per scale"):
        pipe.generate_tokens(labels, 1.0, "linear", 1, 0.0, 1.0, None, known_tokens=[None])
    with pytest.raises(ValueError, match="must have shape"):
        pipe.generate_tokens(labels, 1.0, "linear", 1, 0.0, 1.0, None, known_tokens=[None, torch.zeros(1, 1, 1)])
    with pytest.raises(ValueError, match="needs known tokens"):
        pipe.generate_tokens(labels, 1.0, "linear", 1, 0.0, 1.0, None, keep_masks=[None, torch.ones(1, 2, 2).bool()])


# ----------------------------------------------------------------------------------------------------------------
# Rejected inputs

IMAGE = random_images(2)
MASK = torch.zeros(64, 64)
MASK[:16, :16] = 1


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (FlexVARImg2ImgPipeline, dict(strength=-0.1), "strength"),
        (FlexVARImg2ImgPipeline, dict(strength=1.5), "strength"),
        (FlexVARImg2ImgPipeline, dict(strength=True), "strength"),
        (FlexVARImg2ImgPipeline, dict(class_labels=[1, 2, 3]), "2 images and 3 class labels"),
        (FlexVARImg2ImgPipeline, dict(image=torch.zeros(0, 3, 64, 64)), "empty"),
        (FlexVARImg2ImgPipeline, dict(image=PIL.Image.new("RGB", (0, 0))), "empty"),
        (FlexVARImg2ImgPipeline, dict(image=[]), "empty"),
        (FlexVARImg2ImgPipeline, dict(image=torch.zeros(1, 64, 64)), "RGB"),
        (FlexVARImg2ImgPipeline, dict(image=torch.rand(1, 3, 60, 64), round_to_multiple=False), "multiple of 16"),
        (FlexVARImg2ImgPipeline, dict(height=40), "multiple of 16"),
        (FlexVARInpaintPipeline, dict(mask_image=torch.zeros(3, 1, 64, 64) + 1), "3 masks for 2 images"),
        (FlexVARInpaintPipeline, dict(mask_image=torch.ones(1, 3, 64, 64)), "single-channel"),
        (FlexVARInpaintPipeline, dict(mask_image=np.ones((64, 64, 3))), "single-channel"),
        (FlexVARInpaintPipeline, dict(mask_image=torch.zeros(64, 64)), "nothing to regenerate"),
        (FlexVARInpaintPipeline, dict(mask_image=torch.full((64, 64), 0.4)), "nothing to regenerate"),
        (FlexVARInpaintPipeline, dict(mask_image=torch.stack([MASK, 0 * MASK])), r"\[1\] has no white pixel"),
        (FlexVARInpaintPipeline, dict(mask_image=torch.zeros(0, 0)), "empty"),
        (FlexVARInpaintPipeline, dict(mask_image="mask.png"), "mask_image"),
        (FlexVARInpaintPipeline, dict(mask_threshold=0.0), "mask_threshold"),
        (FlexVARInpaintPipeline, dict(mask_threshold=1.5), "mask_threshold"),
        (FlexVARInpaintPipeline, dict(class_labels=[1, 2, 3]), "2 images and 3 class labels"),
        (FlexVAROutpaintPipeline, dict(), "nothing to generate"),
        (FlexVAROutpaintPipeline, dict(height=32), "at least"),
        (FlexVAROutpaintPipeline, dict(width=128, offset=(8, 0)), "multiples of 16"),
        (FlexVAROutpaintPipeline, dict(width=128, offset=(0, 80)), "does not fit"),
        (FlexVAROutpaintPipeline, dict(width=100), "multiple of 16"),
        (FlexVAROutpaintPipeline, dict(width=128, mask_threshold=2), "mask_threshold"),
    ],
)
def test_bad_inputs_are_rejected(tiny, cls, kwargs, match):
    call = dict(image=IMAGE, class_labels=[1, 2], num_inference_steps=2, output_type="latent")
    if cls is FlexVARInpaintPipeline:
        call["mask_image"] = MASK
    call.update(kwargs)
    with pytest.raises(ValueError, match=match):
        tiny[cls](**call)


@pytest.mark.parametrize(
    "cls, inputs",
    [
        (FlexVARImg2ImgPipeline, dict(strength=0.5)),
        (FlexVARInpaintPipeline, dict(mask_image=torch.ones(1, 1, 64, 64))),
        (FlexVAROutpaintPipeline, dict(width=96)),
    ],
)
def test_image_pipelines_read_the_execution_device_once_per_call(tiny, cls, inputs, monkeypatch):
    """diffusers' `_execution_device` walks every module for offload hooks (about 3 ms for d24 on a CPU host); the
    image-conditioned pipelines read it once, for the input pixels, and put everything else where those are."""
    from diffusers import DiffusionPipeline

    reads = []
    execution_device = DiffusionPipeline._execution_device

    def counted(self):
        reads.append(True)
        return execution_device.fget(self)

    monkeypatch.setattr(DiffusionPipeline, "_execution_device", property(counted))
    tiny[cls](random_images(), class_labels=[1], num_inference_steps=3, output_type="latent", **inputs)
    assert len(reads) == 1
