"""`examples/app.py` (the Gradio demo) without a browser: each tab's handler is the pipeline call its values describe,
with the shipped digits model at small sizes; the page's value conversions, placements and errors; the page's wiring.
The page in a real browser: tests/test_app_browser.py."""

from __future__ import annotations

import re

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT, load_example

app = load_example("app")
# 32x32 pixels (4x4 tokens of the digits model) and 3 scales keep every call well under a second on a CPU.
SIDE, STEPS = 32, 3


@pytest.fixture(scope="module")
def demo():
    return app.FlexVARDemo.from_pretrained(app.SHIPPED_MODEL, "cpu", "float32")


def settings(**overrides) -> app.SamplingSettings:
    return app.SamplingSettings(**{"steps": STEPS, "seed": 5, **overrides})


def direct_call(pipeline, *args, sampling: app.SamplingSettings, **kwargs) -> list[Image.Image]:
    """The pipeline call a handler should make for `sampling`."""
    generator = torch.Generator().manual_seed(sampling.seed)
    return pipeline(*args, **kwargs, **sampling.pipeline_kwargs(), generator=generator).images


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def assert_same_images(actual: list, expected: list[Image.Image]) -> None:
    assert len(actual) == len(expected)
    for image, reference in zip(actual, expected):
        np.testing.assert_array_equal(pixels(image), pixels(reference))


def source_image(height: int = SIDE, width: int = SIDE) -> Image.Image:
    """A two-colour picture: left half dark blue, right half orange."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 2] = (20, 40, 120)
    array[:, width // 2:] = (230, 140, 30)
    return Image.fromarray(array)


class Recorder:
    """Stands in for `gr.Progress`: records `(done, total)` and the description of every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, progress, desc=None):
        self.calls.append((progress, desc))


# ----------------------------------------------------------------------------------------------------------------
# Generate


def test_generate_is_the_pipeline_call_and_reports_scales_and_progress(demo):
    sampling = settings(images_per_class=2)
    progress = Recorder()
    # Number fields give floats; a choice, a typed name and a typed id pick classes.
    gallery, line = demo.generate(["3: 3, three", "seven"], float(SIDE), 48.0, sampling, progress)

    expected = direct_call(demo.pipe, [3, 7], height=SIDE, width=48, sampling=sampling)
    assert_same_images([image for image, _ in gallery], expected)
    assert [image.size for image, _ in gallery] == [(48, SIDE)] * 4
    assert [caption for _, caption in gallery] == ["3, three", "3, three", "7, seven", "7, seven"]
    scales = demo.pipe.scheduler.get_scales(STEPS, SIDE, 48)
    assert len(scales) == STEPS
    grids = ", ".join(f"{h}x{w}" for h, w in scales)
    assert f"output {SIDE}x48" in line and f"{STEPS} scales (token grids {grids})" in line
    assert "guidance 3.5 (constant)" in line and "seed 5" in line and "4 images" in line
    assert [done for done, _ in progress.calls] == [(step, STEPS) for step in range(1, STEPS + 1)]
    assert progress.calls[-1][1] == f"scale {STEPS} of {STEPS} ({scales[-1][0]}x{scales[-1][1]})"


def test_random_seed_is_reported_and_reproduces_the_images(demo):
    gallery, line = demo.generate(["4"], SIDE, SIDE, settings(seed=None))
    seed = int(re.search(r"seed (\d+)", line).group(1))
    again, _ = demo.generate(["4"], SIDE, SIDE, settings(seed=seed))
    assert_same_images([image for image, _ in again], [image for image, _ in gallery])


def test_default_schedule_and_guidance_off_are_described(demo):
    _, line = demo.generate(["1"], SIDE, SIDE, settings(steps=None, guidance_scale=1.0, top_k=0))
    default_scales = demo.pipe.scheduler.get_scales(None, SIDE, SIDE)
    assert f"{len(default_scales)} scales" in line and "guidance off" in line and "top-k 0" in line


@pytest.mark.parametrize(
    ("classes", "height", "sampling", "message"),
    [
        (["2"], 100, settings(), "multiple of 8"),  # the pipeline's size check
        (["2"], SIDE, settings(steps=9), "more steps than distinct scales"),  # 4 tokens: at most 4 scales
        (["eleven"], SIDE, settings(), "Unknown class names"),
        (["12"], SIDE, settings(), r"`class_labels` must be ints in \[0, 10\)"),
        ([], SIDE, settings(), "Pick at least one class"),
        ([str(i) for i in range(9)], SIDE, settings(images_per_class=2), "more than 16 images per request"),
        (["2"], None, settings(), "Height is empty"),
    ],
)
def test_generate_refuses_bad_input_with_a_message(demo, classes, height, sampling, message):
    with pytest.raises(ValueError, match=message):
        demo.generate(classes, height, SIDE, sampling)


def test_class_choices_and_names(demo):
    assert demo.class_choices[7] == "7: 7, seven" and len(demo.class_choices) == 10
    assert demo.class_ids(["0: 0, zero", "nine", " 4 ", 5]) == [0, 9, 4, 5]
    assert demo.class_ids("two") == [2]


def test_sampling_settings_from_page():
    sampling = app.SamplingSettings.from_page(0.0, 2.5, "linear", 50.0, 0.9, 2.0, 11.0, False)
    assert sampling == app.SamplingSettings(None, 2.5, "linear", 50, 0.9, 2, 11)
    assert app.SamplingSettings.from_page(6, 3.5, "constant", 900, 0.95, 1, None, True).seed is None
    assert app.SamplingSettings.from_page(6, 3.5, "constant", 900, 0.95, 1, 0, False).steps == 6
    with pytest.raises(ValueError, match="Top-k must be a whole number, got 2.5"):
        app.SamplingSettings.from_page(0, 3.5, "constant", 2.5, 0.95, 1, 0, False)
    with pytest.raises(ValueError, match="Seed is empty"):
        app.SamplingSettings.from_page(0, 3.5, "constant", 900, 0.95, 1, None, False)


@pytest.mark.parametrize(
    ("ratio", "short", "factor", "size"),
    [("1:1", 96, 8, (96, 96)), ("2:1", 96, 8, (96, 192)), ("1:2", 96, 8, (192, 96)), ("16:9", 256, 16, (256, 448)),
     ("3:4", 256, 16, (336, 256)), ("4:3", 96, 8, (96, 128))],
)
def test_aspect_presets_keep_the_short_side_and_multiples(ratio, short, factor, size):
    assert app.aspect_size(ratio, short, factor) == size


def test_readable_errors_turns_bad_input_into_a_page_message_only():
    with pytest.raises(gr.Error) as caught:
        with app.readable_errors():
            raise ValueError("`top_p` must be in [0, 1], got <2>.")
    assert caught.value.message == "`top_p` must be in [0, 1], got &lt;2&gt;."
    with pytest.raises(gr.Error, match="bad type"):
        with app.readable_errors():
            raise TypeError("bad type")
    with pytest.raises(RuntimeError):  # a bug is not dressed up as bad input
        with app.readable_errors():
            raise RuntimeError("boom")


# ----------------------------------------------------------------------------------------------------------------
# Refine, in-paint, out-paint


def test_refine_is_the_img2img_call(demo):
    sampling = settings()
    gallery, line = demo.refine(source_image(), ["8"], 0.5, sampling)
    expected = direct_call(demo.img2img_pipe, source_image(), [8], strength=0.5, sampling=sampling)
    assert_same_images([image for image, _ in gallery], expected)
    assert line.startswith("strength 0.5 · output 32x32")
    with pytest.raises(ValueError, match="Upload an image to refine"):
        demo.refine(None, ["8"], 0.5, sampling)
    with pytest.raises(ValueError, match="strength"):
        demo.refine(source_image(), ["8"], 1.5, sampling)


def editor_value(background: Image.Image, painted: tuple[int, int, int, int] | None) -> dict:
    """An ImageEditor value: the background and one RGBA layer at twice its size (as an editor canvas may be) with
    the box `painted` (in background pixels) painted white."""
    layer = Image.new("RGBA", (2 * background.width, 2 * background.height), (0, 0, 0, 0))
    if painted is not None:
        layer.paste((255, 255, 255, 255), tuple(2 * value for value in painted))
    return {"background": background.convert("RGBA"), "layers": [layer], "composite": background}


def test_editor_value_gives_the_image_and_the_painted_mask():
    background = Image.new("RGBA", (SIDE, SIDE), (10, 20, 30, 255))
    background.paste((0, 0, 0, 0), (0, 0, 4, 4))  # transparent corner: white in the image
    image, mask = app.editor_image_and_mask(editor_value(background, (16, 8, 32, 24)))
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255) and image.getpixel((9, 9)) == (10, 20, 30)
    expected = np.zeros((SIDE, SIDE), dtype=np.uint8)
    expected[8:24, 16:32] = 255
    np.testing.assert_array_equal(np.asarray(mask), expected)
    with pytest.raises(ValueError, match="Upload an image to in-paint"):
        app.editor_image_and_mask({"background": None, "layers": [], "composite": None})


def test_inpaint_is_the_inpaint_call_and_keeps_unmasked_pixels(demo):
    sampling = settings()
    source = source_image()
    gallery, line = demo.inpaint(editor_value(source, (16, 0, 32, 32)), ["5"], 0.25, True, sampling)
    mask = Image.new("L", (SIDE, SIDE), 0)
    mask.paste(255, (16, 0, 32, 32))
    expected = direct_call(demo.inpaint_pipe, source, mask, [5], mask_threshold=0.25, preserve_unmasked=True,
                           sampling=sampling)
    assert_same_images([image for image, _ in gallery], expected)
    result = pixels(gallery[0][0])
    assert np.abs(result[:, :16] - pixels(source)[:, :16]).max() <= 1  # kept: the input's pixels
    assert np.abs(result[:, 16:] - pixels(source)[:, 16:]).mean() > 5  # painted: regenerated
    assert line.startswith("mask threshold 0.25 · unmasked pixels kept · output 32x32")
    with pytest.raises(ValueError, match="no white pixel"):  # nothing painted: the pipeline's message
        demo.inpaint(editor_value(source, None), ["5"], 0.5, False, sampling)


@pytest.mark.parametrize(
    ("placement", "offset"),
    [("centre", None), ("top-left", (0, 0)), ("top-right", (0, 32)), ("bottom-left", (16, 0)),
     ("bottom-right", (16, 32)), ("offset", (8, 24))],
)
def test_placements(placement, offset):
    assert app.placement_offset(placement, (32, 32), (48, 64), (8, 24)) == offset


def test_outpaint_is_the_outpaint_call(demo):
    sampling = settings()
    source = source_image()
    gallery, line = demo.outpaint(source, ["6"], 32.0, 64.0, "top-right", 0, 0, True, sampling)
    expected = direct_call(demo.outpaint_pipe, source, [6], height=SIDE, width=64, offset=(0, 32),
                           preserve_unmasked=True, sampling=sampling)
    assert_same_images([image for image, _ in gallery], expected)
    assert gallery[0][0].size == (64, SIDE)
    assert np.abs(pixels(gallery[0][0])[:, 32:] - pixels(source)).max() <= 1
    assert line.startswith("32x64 canvas · image 32x32 at top-right · image pixels kept")
    with pytest.raises(ValueError, match="does not fit"):
        demo.outpaint(source, ["6"], 32, 64, "offset", 0, 40, False, sampling)
    with pytest.raises(ValueError, match="Offset top is empty"):
        demo.outpaint(source, ["6"], 32, 64, "offset", None, 0, False, sampling)


def test_large_uploads_are_scaled_down_to_the_largest_size(demo):
    assert demo.max_size == 384
    assert demo.fit(Image.new("RGB", (1000, 500))).size == (384, 192)
    assert demo.fit(Image.new("L", (100, 50))).size == (100, 50)


def test_gallery_selection():
    red, green = Image.new("RGB", (8, 8), "red"), Image.new("RGBA", (8, 8), "green")
    assert app.gallery_image([(red, "a"), (green, "b")], 1).getpixel((0, 0)) == (0, 128, 0)
    assert app.gallery_image([(red, "a"), (green, "b")], None).getpixel((0, 0)) == (255, 0, 0)
    with pytest.raises(ValueError, match="generate an image first"):
        app.gallery_image([], None)


# ----------------------------------------------------------------------------------------------------------------
# The page and the command line


def test_page_queues_every_pipeline_call_one_at_a_time(demo):
    page = app.build_demo(demo, title="digits")
    pipeline_calls = {fn.api_name: fn for fn in page.fns.values() if fn.api_visibility == "public"}
    assert set(pipeline_calls) == {"generate", "refine", "inpaint", "outpaint"}
    for fn in pipeline_calls.values():
        assert fn.queue and fn.concurrency_id == "pipeline" and fn.concurrency_limit == 1
    # The editing pipelines share the loaded modules.
    for pipeline in (demo.img2img_pipe, demo.inpaint_pipe, demo.outpaint_pipe):
        assert pipeline.transformer is demo.pipe.transformer and pipeline.vqvae is demo.pipe.vqvae


def test_command_line_defaults(monkeypatch):
    monkeypatch.delenv(app.MODEL_ENV, raising=False)
    args = app.parse_args([])
    assert args.model is None and args.dtype == "float32" and args.port is None and not args.share
    assert app.SHIPPED_MODEL == REPO_ROOT / "models" / "flexvar-digits"
    monkeypatch.setenv(app.MODEL_ENV, "someone/flexvar-d16")
    assert app.parse_args([]).model == "someone/flexvar-d16"
    assert app.parse_args(["--model", "local/dir", "--port", "7000"]).port == 7000
