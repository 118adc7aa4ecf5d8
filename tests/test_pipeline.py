"""FlexVARPipeline: parity with the original sampler, and what a diffusers user relies on."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from flexvar_hf import FlexVARTransformer2DModel, FlexVQModel
from flexvar_hf.conversion import pipeline_from_original
from flexvar_hf.pipelines import FlexVARPipeline
from flexvar_hf.schedulers import FlexVARScaleScheduler

from conftest import PIXEL_TOLERANCE, with_active_blocks


@pytest.fixture(scope="module")
def parity_pipe(transformer_ckpt, vq_ckpt):
    pipe = pipeline_from_original(transformer_ckpt, vq_ckpt)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_tiny_pipe(seed: int = 0, num_classes: int = 10) -> FlexVARPipeline:
    torch.manual_seed(seed)
    transformer = FlexVARTransformer2DModel(
        num_classes=num_classes,
        vocab_size=64,
        code_dim=8,
        num_layers=2,
        hidden_size=64,
        num_attention_heads=2,
        pos_grid_size=8,
    )
    with_active_blocks(transformer)
    vqvae = FlexVQModel(base_channels=32, channel_multipliers=(1, 1, 2, 2, 4), z_channels=32, num_codes=64, code_dim=8)
    pipe = FlexVARPipeline(
        transformer.eval(),
        vqvae.eval(),
        FlexVARScaleScheduler(),
        id2label={i: f"class {i}, synonym {i}" for i in range(num_classes)},
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny_pipe():
    return make_tiny_pipe()


# The original's guidance modes in our convention: `var` is the linear ramp to 1 + cfg, `llamagen` constant cfg.
MODES = {"var": (3.5, "linear"), "llamagen": (2.5, "constant")}


@pytest.mark.parametrize("run", [0, 1])
@pytest.mark.parametrize("mode", ["var", "llamagen"])
def test_greedy_generation_matches_original(parity_pipe, reference, reference_info, run, mode):
    info = next(r for r in reference_info["inference_runs"] if r["key"] == f"infer_{run}_{mode}")
    guidance_scale, schedule = MODES[mode]
    steps = []
    tokens = parity_pipe(
        reference["labels"],
        scales=info["infer_patch_nums"],
        guidance_scale=guidance_scale,
        guidance_schedule=schedule,
        top_k=1,
        output_type="latent",
        callback_on_step_end=lambda pipe, i, t, kw: steps.append(kw["indices"].clone()) or {},
    ).images
    assert len(steps) == len(info["infer_patch_nums"])
    for step, indices in enumerate(steps):
        assert torch.equal(indices.flatten(1), reference[f"infer_{run}_{mode}_step_{step}_indices"]), step
    with torch.no_grad():
        pixels = parity_pipe.vqvae.decode_indices(tokens).sample
    expected = reference[f"infer_{run}_{mode}_image"]
    assert pixels.shape == tuple(info["image_shape"])
    assert (pixels - expected).abs().max() < PIXEL_TOLERANCE


def test_pt_output_is_the_decoded_image_in_unit_range(parity_pipe, reference):
    images = parity_pipe(
        reference["labels"],
        height=128,
        width=128,
        scales=[1, 2, 4, 6, 8],
        guidance_scale=3.5,
        top_k=1,
        output_type="pt",
    ).images
    expected = (reference["infer_1_var_image"] / 2 + 0.5).clamp(0, 1)
    assert images.shape == (2, 3, 128, 128)
    assert (images - expected).abs().max() < PIXEL_TOLERANCE


def test_default_arguments_are_the_paper_settings(tiny_pipe):
    import inspect

    params = inspect.signature(FlexVARPipeline.__call__).parameters
    assert params["guidance_scale"].default == 3.5 and params["guidance_schedule"].default is None
    assert tiny_pipe.scheduler.config.guidance_schedule == "linear"  # None: the scheduler's, the paper's ramp
    assert params["top_k"].default == 900 and params["top_p"].default == 0.95
    assert params["height"].default is None and params["width"].default is None  # the training size:
    assert tiny_pipe.default_sample_size == 256  # 256 for a transformer with the released models' sample_size
    scheduler = FlexVARScaleScheduler()
    scheduler.set_timesteps(None, height=256, width=256)
    assert [h for h, _ in scheduler.scales] == [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]


def test_the_scheduler_config_sets_the_default_guidance_schedule(tmp_path):
    pipe = make_tiny_pipe()

    def tokens(**kwargs):
        return pipe([3, 4], height=64, width=64, top_k=1, output_type="latent", **kwargs).images

    linear, constant = tokens(guidance_schedule="linear"), tokens(guidance_schedule="constant")
    assert not torch.equal(linear, constant)  # the two schedules choose different tokens for this model
    assert torch.equal(tokens(), linear)
    pipe.scheduler = FlexVARScaleScheduler.from_config(pipe.scheduler.config, guidance_schedule="constant")
    assert torch.equal(tokens(), constant) and torch.equal(tokens(guidance_schedule="linear"), linear)
    pipe.save_pretrained(tmp_path)
    reloaded = FlexVARPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert reloaded.scheduler.config.guidance_schedule == "constant"
    assert torch.equal(reloaded([3, 4], height=64, width=64, top_k=1, output_type="latent").images, constant)


def test_output_types_carry_the_same_pixels(tiny_pipe):
    """pil, np and pt are one decoded image in three containers, and latent holds the tokens they decode from."""

    def images(output_type):
        return tiny_pipe(
            [1, 2],
            height=32,
            width=64,
            num_inference_steps=2,
            num_images_per_prompt=2,
            generator=torch.Generator().manual_seed(0),
            output_type=output_type,
        ).images

    tokens, pt, array, pil = images("latent"), images("pt"), images("np"), images("pil")
    assert tokens.dtype == torch.long and tokens.shape == (4, 2, 4) and 0 <= tokens.min() and tokens.max() < 64
    with torch.no_grad():
        decoded = tiny_pipe.vqvae.decode_indices(tokens).sample
    assert pt.shape == (4, 3, 32, 64) and 0 <= pt.min() and pt.max() <= 1 and pt.std() > 0.01
    torch.testing.assert_close(pt, (decoded / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-6)
    assert isinstance(array, np.ndarray) and array.dtype == np.float32
    np.testing.assert_array_equal(array, pt.permute(0, 2, 3, 1).numpy())
    assert len(pil) == 4 and all(isinstance(im, PIL.Image.Image) and im.size == (64, 32) for im in pil)
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in pil]), (array * 255).round().astype(np.uint8))


def test_seeded_generation_is_reproducible(tiny_pipe):
    def run(seed):
        return tiny_pipe(
            [3, 4],
            height=64,
            width=64,
            num_inference_steps=4,
            top_k=0,
            top_p=0.0,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
        ).images

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_save_and_load_round_trip_gives_identical_images(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "tiny")
    loaded = FlexVARPipeline.from_pretrained(tmp_path / "tiny")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.id2label == tiny_pipe.id2label and loaded.get_label_ids("synonym 7") == [7]
    kwargs = dict(class_labels=[0, 9], height=48, width=32, num_inference_steps=3, output_type="np")
    first = tiny_pipe(**kwargs, generator=torch.Generator().manual_seed(5)).images
    second = loaded(**kwargs, generator=torch.Generator().manual_seed(5)).images
    np.testing.assert_array_equal(first, second)


def test_default_size_is_the_training_size(tmp_path):
    pipe = make_tiny_pipe()
    assert pipe.default_sample_size == 256  # sample_size 16 x 16 pixels per token, the released models' 256x256
    pipe.transformer.register_to_config(sample_size=3)
    pipe.save_pretrained(tmp_path / "tiny")
    loaded = FlexVARPipeline.from_pretrained(tmp_path / "tiny")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.transformer.config.sample_size == 3 and loaded.default_sample_size == 48
    call = dict(class_labels=[1], num_inference_steps=2, top_k=1, output_type="latent")
    assert loaded(**call).images.shape == (1, 3, 3)
    assert loaded(**call, width=32).images.shape == (1, 3, 2)  # an explicit side wins
    with pytest.raises(ValueError, match="sample_size"):
        FlexVARTransformer2DModel(sample_size=0)


def test_class_names_and_tensors_are_accepted(tiny_pipe):
    by_name = tiny_pipe(
        ["class 2", "synonym 3"], height=16, width=16, num_inference_steps=1, top_k=1, output_type="latent"
    ).images
    by_id = tiny_pipe(
        torch.tensor([2, 3]), height=16, width=16, num_inference_steps=1, top_k=1, output_type="latent"
    ).images
    assert torch.equal(by_name, by_id)


def test_non_square_and_many_step_generation(tiny_pipe):
    seen = []
    tokens = tiny_pipe(
        5,
        height=64,
        width=128,
        num_inference_steps=8,
        top_k=1,
        output_type="latent",
        callback_on_step_end=lambda p, i, t, kw: seen.append(tuple(kw["indices"].shape[1:])) or {},
    ).images
    assert tokens.shape == (1, 4, 8)
    assert len(seen) == 8 and seen[-1] == (4, 8) and len(set(seen)) == 8


def test_guidance_off_matches_unbatched_conditional_model(tiny_pipe):
    # With g = 1 only the conditional branch runs; greedy tokens equal argmax of the conditional logits.
    tokens = tiny_pipe(
        [4], height=16, width=16, num_inference_steps=1, guidance_scale=1.0, top_k=1, output_type="latent"
    ).images
    with torch.no_grad():
        logits = tiny_pipe.transformer(torch.tensor([4]), [1]).logits
    assert tokens.flatten().tolist() == logits.argmax(-1).flatten().tolist()


def test_guided_generation_runs_the_head_on_the_conditional_rows_only(tiny_pipe, monkeypatch):
    """The pipeline hands the guidance of each step to the transformer, which combines the features before its
    head: the scheduler sees B rows of logits, not the 2B of the guided batch."""
    seen = []
    step = tiny_pipe.scheduler.step

    def recording_step(model_output, *args, **kwargs):
        seen.append((model_output.shape[0], kwargs.get("guidance_scale", 1.0)))
        return step(model_output, *args, **kwargs)

    monkeypatch.setattr(tiny_pipe.scheduler, "step", recording_step)
    tiny_pipe([1, 2, 3], height=32, width=32, num_inference_steps=2, guidance_scale=3.0, output_type="latent")
    assert seen == [(3, 1.0), (3, 1.0)]


def test_bfloat16_transformer_chooses_float32s_tokens(tiny_pipe):
    """A bfloat16 transformer moves the logits by its rounding; greedy tokens agree with float32's but where two
    logits lie within that rounding, or a changed coarse token changes what follows (1 of the 48 final tokens here);
    the decoded images are float32 and equal wherever all tokens agree."""
    pipe = make_tiny_pipe()
    call = dict(class_labels=[1, 5, 7], height=64, width=64, num_inference_steps=2, top_k=1)
    full = pipe(**call, output_type="latent").images
    full_pixels = pipe(**call, output_type="pt").images
    pipe.transformer.to(torch.bfloat16)
    half = pipe(**call, output_type="latent").images
    images = pipe(**call, output_type="pt").images
    agreement = (half == full).float().mean().item()
    assert agreement >= 0.9, agreement
    assert images.dtype == torch.float32 and images.shape == (3, 3, 64, 64) and 0 <= images.min() <= images.max() <= 1
    same_images = [i for i in range(3) if torch.equal(half[i], full[i])]
    assert same_images
    torch.testing.assert_close(images[same_images], full_pixels[same_images], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(height=40), "multiple of 16"),
        (dict(width=0), "multiple of 16"),
        (dict(class_labels=[10]), r"\[0, 10\)"),
        (dict(class_labels=[-1]), r"\[0, 10\)"),
        (dict(class_labels=["no such class"]), "Unknown class names"),
        (dict(class_labels=[]), "class_labels"),
        (dict(num_inference_steps=0), "num_inference_steps|steps"),
        (dict(num_inference_steps=5, height=64, width=64), "4"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=1.5), "top_p"),
        (dict(guidance_scale=-0.5), "guidance_scale"),
        (dict(output_type="jpeg"), "output_type"),
        (dict(guidance_schedule="cosine"), "guidance_schedule|linear"),
        (dict(scales=[(1, 2, 3)]), "scale"),
        (dict(scales=[]), "scale"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
    ],
)
def test_bad_arguments_are_rejected(tiny_pipe, kwargs, match):
    call = dict(class_labels=[1], height=64, width=64, num_inference_steps=2)
    call.update(kwargs)
    with pytest.raises(ValueError, match=match):
        tiny_pipe(**call)
