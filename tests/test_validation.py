"""Hostile but realistic inputs to the pipelines: clear errors at once, never silently wrong results.

Each test reproduces a class of problems found by trying bad or edge inputs: images in 0..255, sizes that cannot
fit, conflicting arguments, wrong types, callbacks that replace tokens.
"""

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
)
from flexvar_hf.pipelines import pipeline_flexvar
from flexvar_hf.utils.validation import check_agreement, check_flag, check_int, check_number

from conftest import load_example
from test_pipeline import make_tiny_pipe

EDITING = (FlexVARImg2ImgPipeline, FlexVARInpaintPipeline, FlexVAROutpaintPipeline)


@pytest.fixture(scope="module")
def pipes() -> dict:
    base = make_tiny_pipe()
    pipes = {cls: cls.from_pipe(base) for cls in EDITING}
    pipes[FlexVARPipeline] = base
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def uint8_image(seed: int = 0, size: int = 32) -> np.ndarray:
    """A smooth (size, size, 3) uint8 picture, as `np.asarray(pil_image)` gives."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, size // 8, size // 8, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")[0]
    return (smooth.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def edit(pipe, image, **kwargs):
    """Greedy tokens of one edit of `image` as class 3 (the same call whatever form the image takes)."""
    extra = {
        FlexVARImg2ImgPipeline: dict(strength=0.0),  # the image's own tokens
        FlexVARInpaintPipeline: dict(mask_image=MASK),
        FlexVAROutpaintPipeline: dict(width=48),
    }[type(pipe)]
    call = dict(class_labels=3, num_inference_steps=2, top_k=1, output_type="latent") | extra | kwargs
    return pipe(image, **call).images


MASK = np.zeros((32, 32), dtype=np.uint8)
MASK[:, 16:] = 255


# ----------------------------------------------------------------------------------------------------------------
# One rule per concept


def test_the_shared_argument_rules():
    assert check_int("steps", np.int64(3), minimum=1) == 3 and type(check_int("steps", np.int32(3))) is int
    for bad in (True, np.bool_(True), 3.0, "3", None, torch.tensor(3)):
        with pytest.raises(ValueError, match=r"`steps` must be an int, got"):
            check_int("steps", bad)
    with pytest.raises(ValueError, match=r"`steps` must be a positive int, got 0 \(int\)"):
        check_int("steps", 0, minimum=1)
    assert check_number("scale", np.float32(0.5), 0, 1) == 0.5 and check_number("scale", 1, 0, 1) == 1.0
    for bad in (True, float("nan"), float("inf"), "0.5", 1.5):
        with pytest.raises(ValueError, match=r"`scale` must be a finite number in \[0, 1\]"):
            check_number("scale", bad, 0, 1)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        check_number("scale", 0, 0, 1, open_minimum=True)
    assert check_flag("flag", np.bool_(False)) is False
    with pytest.raises(ValueError, match="`flag` must be True or False, got 'no'"):
        check_flag("flag", "no")
    check_agreement("scales", {"height": 32, "width": 64}, {"height": 32, "width": None})
    with pytest.raises(ValueError, match=r"`width`=48 \(`scales` gives 64\)"):
        check_agreement("scales", {"height": 32, "width": 64}, {"height": 32, "width": 48})


# ----------------------------------------------------------------------------------------------------------------
# Image values


def test_uint8_and_float_images_are_read_as_the_same_pixels(pipes):
    """`np.asarray(pil_image)` (uint8, 0..255) must not be read as [0, 1] and clipped (almost white): every form of a
    picture gives the pixels of the PIL image."""
    pipe = pipes[FlexVARImg2ImgPipeline]
    array = uint8_image()
    expected = pipe.prepare_image(PIL.Image.fromarray(array))
    unit = array.astype(np.float32) / 255
    variants = {
        "uint8 array": array,
        "uint8 batch": array[None],
        "list of uint8 arrays": [array],
        "float array in [0, 1]": unit,
        "float64 array in [0, 1]": unit.astype(np.float64),
        "uint8 tensor": torch.from_numpy(array.copy()).permute(2, 0, 1),
        "float tensor in [0, 1]": torch.from_numpy(unit).permute(2, 0, 1),
    }
    for name, image in variants.items():
        assert torch.equal(pipe.prepare_image(image), expected), name
    half = pipe.prepare_image(torch.from_numpy(unit).permute(2, 0, 1).half())
    assert (half - expected).abs().max() < 2e-3  # float16's rounding
    signed = pipe.prepare_image(torch.from_numpy(unit * 2 - 1).permute(2, 0, 1)[None])  # diffusers' [-1, 1]
    assert (signed - expected).abs().max() < 1e-6
    assert expected.mean().item() == pytest.approx(array.mean() / 127.5 - 1, abs=1e-5)
    # Resampling overshoot within 1e-3 of [0, 1] is clamped, not refused.
    overshoot = unit * 1.0005
    assert torch.equal(pipe.prepare_image(overshoot), pipe.prepare_image(np.clip(overshoot, 0, 1)))


@pytest.mark.parametrize("cls", EDITING)
def test_every_editing_pipeline_reads_uint8_images_as_0_to_255(pipes, cls):
    array = uint8_image()
    expected = edit(pipes[cls], PIL.Image.fromarray(array))
    assert torch.equal(edit(pipes[cls], array), expected)
    # The white-clipped reading of old gives other tokens: the comparison above can fail.
    assert not torch.equal(edit(pipes[cls], np.ones_like(array, dtype=np.float32)), expected)


@pytest.mark.parametrize("cls", EDITING)
def test_images_whose_range_cannot_be_unit_are_refused(pipes, cls):
    array = uint8_image()
    nan = array.astype(np.float32) / 255
    nan[0, 0, 0] = np.nan
    refused = {
        "float array in 0..255": (array.astype(np.float32), r"values in \[\d+, \d+\].*divide by 255 or pass uint8"),
        "float tensor in 0..255": (torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1), "divide by 255"),
        "int64 array": (array.astype(np.int64), "dtype int64, whose range is ambiguous"),
        "int64 tensor": (torch.from_numpy(array.astype(np.int64)).permute(2, 0, 1), "dtype torch.int64, whose range"),
        "uint16 array": (array.astype(np.uint16) * 257, "dtype uint16"),
        "bool tensor": (torch.ones(3, 32, 32, dtype=torch.bool), "dtype torch.bool"),
        "NaN": (nan, r"values in \[nan, nan\]"),
        "below -1": (array.astype(np.float32) / 255 - 1.5, r"values in \[-1.4"),
        "object array": (np.array([[["a"] * 3] * 32] * 32, dtype=object), "dtype object"),
        "mixed list": ([array, PIL.Image.fromarray(array)], "must be of one kind"),
    }
    for name, (image, match) in refused.items():
        with pytest.raises(ValueError, match=f"`image`.*{match}|{match}") as error:
            edit(pipes[cls], image)
        assert "image" in str(error.value), name


def test_masks_follow_the_same_value_rule(pipes):
    pipe = pipes[FlexVARInpaintPipeline]
    expected = pipe.prepare_mask(MASK, 1, 32, 32)
    assert torch.equal(pipe.prepare_mask(MASK.astype(bool), 1, 32, 32), expected)
    assert torch.equal(pipe.prepare_mask(torch.from_numpy(MASK / 255.0).float(), 1, 32, 32), expected)
    for mask, match in [(MASK.astype(np.float32), r"`mask_image` has values in \[0, 255\]"),
                        (MASK.astype(np.int32), "dtype int32"), (-torch.ones(32, 32), r"in \[-1, -1\]"),
                        ([MASK, PIL.Image.fromarray(MASK)], "mixes PIL images"),
                        ([MASK, MASK[:16]], r"one size \(H, W\); got \[\(16, 32\), \(32, 32\)\]")]:
        with pytest.raises(ValueError, match=match):
            pipe.prepare_mask(mask, 1, 32, 32)


# ----------------------------------------------------------------------------------------------------------------
# Size budget


@pytest.fixture
def transformer_calls(pipes):
    calls = []
    hooks = [pipes[FlexVARPipeline].transformer.register_forward_hook(lambda *args: calls.append("transformer")),
             pipes[FlexVARPipeline].vqvae.register_forward_pre_hook(lambda *args: calls.append("vqvae"))]
    yield calls
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (FlexVARPipeline, dict(height=100000, width=32)),  # ran on for minutes
        (FlexVARPipeline, dict(height=100000, width=100000)),  # tried to allocate 2.7 TB
        (FlexVARPipeline, dict(scales=[1, 4, 2000])),
        (FlexVARImg2ImgPipeline, dict(height=100000, width=32)),
        (FlexVARInpaintPipeline, dict(height=64, width=100000)),
        (FlexVAROutpaintPipeline, dict(height=100000, width=64)),  # the out-painting canvas
    ],
)
def test_what_cannot_fit_is_refused_at_once(pipes, transformer_calls, monkeypatch, cls, kwargs):
    def no_pixels(*args, **kwargs):
        raise AssertionError("the images were read before the size was checked")

    for pipe in pipes.values():
        monkeypatch.setattr(pipe.image_processor, "preprocess", no_pixels)
    inputs = dict(class_labels=3) if cls is FlexVARPipeline else dict(image=uint8_image(), class_labels=3)
    if cls is FlexVARInpaintPipeline:
        inputs["mask_image"] = MASK
    with pytest.raises(ValueError, match=r"size budget `max_tokens_per_image` = 32768.*`height` / `width`"):
        pipes[cls](**inputs, **kwargs)
    assert transformer_calls == []


def test_the_size_budget_is_the_tokens_of_all_scales_and_configurable():
    pipe = make_tiny_pipe()
    pipe.scheduler = FlexVARScaleScheduler.from_config(pipe.scheduler.config, max_tokens_per_image=20)
    call = dict(class_labels=1, height=64, width=64, top_k=1, output_type="latent")
    assert pipe(**call, num_inference_steps=2).images.shape == (1, 4, 4)  # 1 + 16 tokens
    with pytest.raises(ValueError, match=r"its 4 scales hold 30 tokens, more than .* = 20"):
        pipe(**call)  # 1 + 4 + 9 + 16
    with pytest.raises(ValueError, match=r"final token grid alone holds 25 tokens"):
        pipe.scheduler.token_grid(80, 80)
    scheduler = FlexVARScaleScheduler()
    scheduler.set_timesteps(None, 1024, 1024)  # 1024x1024 at the default 20 steps fits the default budget
    assert sum(h * w for h, w in scheduler.scales) == 15155
    with pytest.raises(ValueError, match="59412 tokens"):
        scheduler.set_timesteps(None, 2048, 2048)


def test_the_memory_estimate_is_checked_against_the_device(pipes, monkeypatch, transformer_calls):
    pipe = pipes[FlexVARPipeline]
    pipe.scheduler.set_timesteps(3, 64, 64)
    estimate = pipe.memory_estimate(num_images=5, guided=True, top_k=10)
    cache = pipe.transformer.init_kv_cache(10, 1 + 4 + 16)
    assert estimate["key/value cache"] == sum(buffer.nbytes for buffer in cache.key_values)  # exact
    assert estimate["logits and sampling"] == 5 * 16 * (64 * 4 + 10 * 20)

    # A batch that cannot fit any machine is refused before the transformer runs, with the reason.
    with pytest.raises(ValueError, match=r"needs at least \d+\.\d GiB on cpu \(key/value cache .*`num_images_per_pr"):
        pipe(1, height=256, width=256, num_images_per_prompt=10**6)
    pipe.scheduler.set_timesteps(3, 64, 64)
    needed = sum(pipe.memory_estimate(2, True, 900).values())
    monkeypatch.setattr(pipeline_flexvar, "available_memory", lambda device: needed - 1)
    with pytest.raises(ValueError, match="needs at least"):
        pipe([1, 2], height=64, width=64, num_inference_steps=3)
    monkeypatch.setattr(pipeline_flexvar, "available_memory", lambda device: needed)
    pipe([1, 2], height=64, width=64, num_inference_steps=3, output_type="latent")
    monkeypatch.setattr(pipeline_flexvar, "available_memory", lambda device: 1)
    with pytest.raises(ValueError, match="needs at least"):
        pipes[FlexVAROutpaintPipeline](uint8_image(), 1, width=48, num_inference_steps=2)
    assert transformer_calls == ["transformer"] * 3  # only the call that fitted ran


# ----------------------------------------------------------------------------------------------------------------
# Conflicting arguments


def test_scales_and_the_arguments_they_set_must_agree(pipes):
    pipe = pipes[FlexVARPipeline]
    call = dict(class_labels=[1, 2], top_k=1, output_type="latent")
    expected = pipe(**call, scales=[1, 2, (2, 4)]).images
    assert expected.shape == (2, 2, 4)
    agreeing = pipe(**call, scales=[1, 2, (2, 4)], height=32, width=64, num_inference_steps=3).images
    assert torch.equal(agreeing, expected)
    for given, match in [
        (dict(height=64), r"`height`=64 \(`scales` gives 32\)"),
        (dict(width=32), r"`width`=32 \(`scales` gives 64\)"),
        (dict(num_inference_steps=10), r"`num_inference_steps`=10 \(`scales` gives 3\)"),
        (dict(height=16, width=16), r"`height`=16 .*`width`=16"),
    ]:
        with pytest.raises(ValueError, match=match):
            pipe(**call, scales=[1, 2, (2, 4)], **given)
    scheduler = FlexVARScaleScheduler()
    with pytest.raises(ValueError, match="`num_inference_steps`=5"):
        scheduler.set_timesteps(5, scales=[1, 2])


def test_preserve_unmasked_with_latent_output_is_a_conflict(pipes):
    for cls, extra in ((FlexVARInpaintPipeline, dict(mask_image=MASK)), (FlexVAROutpaintPipeline, dict(width=48))):
        with pytest.raises(ValueError, match=r"`preserve_unmasked`=True \(`output_type='latent'` gives False\)"):
            pipes[cls](uint8_image(), class_labels=1, **extra, preserve_unmasked=True, output_type="latent")


# ----------------------------------------------------------------------------------------------------------------
# Types: a bool is not an int, numpy integers are integers


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_images_per_prompt=True), r"`num_images_per_prompt` must be a positive int, got True \(bool\)"),
        (dict(num_images_per_prompt=2.0), "`num_images_per_prompt` must be a positive int"),
        (dict(top_k=True), "`top_k` must be an int >= 0"),
        (dict(height=True), "`height` and `width`"),
        (dict(num_inference_steps=2.0), "`num_inference_steps` must be a positive int"),
        (dict(guidance_scale=True), "`guidance_scale` must be a finite number >= 0"),
        (dict(guidance_scale=float("inf")), "`guidance_scale`"),
        (dict(temperature=float("nan")), "`temperature`"),
        (dict(top_p=np.array([0.5, 0.6])), "`top_p`"),
        (dict(class_labels=True), r"`class_labels` must be an int, .* got True \(bool\)"),
        (dict(class_labels=[True]), r"`class_labels` must be ints in \[0, 10\)"),
        (dict(class_labels=[1.0]), r"`class_labels` must be ints"),
        (dict(class_labels=np.zeros((2, 2), dtype=int)), "`class_labels` must be an int, a class name"),
        (dict(class_labels=torch.tensor([1.5])), r"`class_labels` must be ints"),
        (dict(class_labels=["no such class"]), r"Unknown class names \['no such class'\] \(`class_labels`\)"),
        (dict(generator=0), "`generator` must be"),
        (dict(generator=np.random.default_rng(0)), "`generator` must be"),
        (dict(callback_on_step_end=3), "`callback_on_step_end` must be a function"),
        (dict(callback_on_step_end_tensor_inputs="indices"), "`callback_on_step_end_tensor_inputs` must be a list"),
        (dict(callback_on_step_end_tensor_inputs=None), "`callback_on_step_end_tensor_inputs` must be a list"),
        (dict(callback_on_step_end_tensor_inputs=["latents"]), "`callback_on_step_end_tensor_inputs`"),
        (dict(output_type=["pil"]), "`output_type` must be one of"),
        (dict(guidance_schedule=np.array(["linear"])), "`guidance_schedule` must be one of"),
        (dict(return_dict="no"), "`return_dict` must be True or False"),
        (dict(scales=np.array([[1, 1], [2, 2]]), height=None, width=None), None),  # accepted
    ],
)
def test_argument_types(pipes, kwargs, match):
    call = dict(class_labels=[1], height=32, width=32, num_inference_steps=2, output_type="latent") | kwargs
    if match is None:
        assert pipes[FlexVARPipeline](**call | dict(num_inference_steps=None)).images.shape == (1, 2, 2)
        return
    with pytest.raises((ValueError, TypeError), match=match):
        pipes[FlexVARPipeline](**call)


def test_numpy_integers_are_integers(pipes):
    pipe = pipes[FlexVARPipeline]
    call = dict(top_k=1, output_type="latent")
    expected = pipe([1, 2], height=32, width=64, num_inference_steps=2, num_images_per_prompt=2, **call).images
    numpy = pipe(np.array([1, 2]), height=np.int64(32), width=np.int32(64), num_inference_steps=np.int64(2),
                 num_images_per_prompt=np.int64(2), **call).images
    assert torch.equal(numpy, expected)
    single = pipe(np.int64(7), height=32, width=32, num_inference_steps=2, **call).images
    assert torch.equal(single, pipe(7, height=32, width=32, num_inference_steps=2, **call).images)
    refined = pipes[FlexVARImg2ImgPipeline](uint8_image(), np.int64(3), strength=np.float32(0.5), **call).images
    assert torch.equal(refined, pipes[FlexVARImg2ImgPipeline](uint8_image(), 3, strength=0.5, **call).images)


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (FlexVARImg2ImgPipeline, dict(strength=np.nan), "`strength` must be a finite number in"),
        (FlexVARImg2ImgPipeline, dict(round_to_multiple="yes"), "`round_to_multiple` must be True or False"),
        (FlexVARInpaintPipeline, dict(mask_image=MASK, preserve_unmasked=1), "`preserve_unmasked` must be True"),
        (FlexVARInpaintPipeline, dict(mask_image=MASK, mask_threshold=True), "`mask_threshold`"),
        (FlexVAROutpaintPipeline, dict(width=48, offset=(0, True)), "`offset` must be"),
        (FlexVAROutpaintPipeline, dict(width=48, offset=(0, 2**40)), "`offset`"),
        (FlexVAROutpaintPipeline, dict(width=16), r"canvas \(`height` x `width` = 32x16\) must be at least"),
    ],
)
def test_editing_argument_types(pipes, cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipes[cls](uint8_image(), class_labels=1, num_inference_steps=2, output_type="pt", **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Callbacks and return_dict


def test_a_callback_can_replace_the_indices_of_a_step(pipes):
    """The replaced tokens are what later scales are conditioned on: greedy generation with the first scale replaced
    equals generation with that scale given as known tokens."""
    pipe = pipes[FlexVARPipeline]
    call = dict(class_labels=[3, 8], height=64, width=64, num_inference_steps=3, top_k=1, output_type="latent")
    replacement = torch.tensor([[[7]], [[60]]])

    def replace_first(pipe, step_index, timestep, kwargs):
        return {"indices": replacement} if step_index == 0 else {}

    replaced = pipe(**call, callback_on_step_end=replace_first).images
    pipe.scheduler.set_timesteps(3, height=64, width=64)
    with torch.no_grad():
        known = pipe.generate_tokens(torch.tensor([3, 8]), 3.5, None, 1, 0.95, 1.0, None,
                                     known_tokens=[replacement, None, None])
    assert torch.equal(replaced, known)
    assert not torch.equal(replaced, pipe(**call).images)  # the replacement changed what followed

    for bad, match in [
        ({"indices": replacement.float()}, r"expected an integer tensor of shape \(2, 1, 1\)"),
        ({"indices": torch.zeros(2, 2, 2, dtype=torch.long)}, r"got torch.int64 \(2, 2, 2\)"),
        ({"indices": replacement + 64}, r"values in \[0, 64\)"),
        ({"indices": [[7], [60]]}, "got"),
        (["indices"], "must return a dict"),
    ]:
        with pytest.raises(ValueError, match=f"`callback_on_step_end`.*{match}"):
            pipe(**call, callback_on_step_end=lambda pipe, i, t, kwargs, bad=bad: bad)


@pytest.mark.parametrize("cls", [FlexVARPipeline, *EDITING])
def test_return_dict_false_returns_the_same_images_in_a_tuple(pipes, cls):
    inputs = dict(class_labels=[1, 2]) if cls is FlexVARPipeline else dict(image=uint8_image(), class_labels=[1, 2])
    extra = {FlexVARInpaintPipeline: dict(mask_image=MASK), FlexVAROutpaintPipeline: dict(width=48)}.get(cls, {})
    call = inputs | extra | dict(num_inference_steps=2, output_type="np")
    if cls is FlexVARPipeline:
        call |= dict(height=32, width=32)
    as_dict = pipes[cls](**call, generator=torch.Generator().manual_seed(0))
    as_tuple = pipes[cls](**call, generator=torch.Generator().manual_seed(0), return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    np.testing.assert_array_equal(as_tuple[0], as_dict.images)


# ----------------------------------------------------------------------------------------------------------------
# Example scripts


def test_example_scripts_stop_bad_inputs_with_a_message(tmp_path):
    edit = load_example("edit")
    with pytest.raises(SystemExit, match="--image .*missing.png' cannot be read as an image"):
        edit.main(["--image", str(tmp_path / "missing.png"), "--output_dir", str(tmp_path / "out")])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    with pytest.raises(SystemExit, match="--mask .*broken.png' cannot be read as an image"):
        edit.main(["--mask", str(broken), "--output_dir", str(tmp_path / "out")])
    generate = load_example("generate")
    with pytest.raises(SystemExit, match=r"error: 100000x32, 3 steps, classes \[1\]: .*`max_tokens_per_image`"):
        generate.main(["--sizes", "100000x32", "--steps", "3", "--classes", "1", "--output", str(tmp_path / "a.png")])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["broken.png"]  # nothing written
