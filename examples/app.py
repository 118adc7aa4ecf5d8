"""A web demo of the FlexVAR pipelines (Gradio): generate, refine (image-to-image), in-paint and out-paint.

    pip install -e ".[app]"
    python examples/app.py                        # the shipped digits model, http://127.0.0.1:7860
    python examples/app.py --model path/or/hub-id --device cuda --dtype float16 --port 7861 [--share]

The page is a thin layer over the pipelines. `FlexVARDemo` loads one FlexVARPipeline, makes the editing pipelines
from it with `from_pipe` (the same modules, loaded once) and has one handler per tab: it maps the page's values to
one pipeline call and returns the images with a line of the effective settings (size, scales, guidance, seed).
`build_demo` lays out the page and wires it to the handlers; requests queue and run one at a time, and a ValueError
or TypeError of a pipeline is shown on the page as its message.

As a Hugging Face Space: copy this file to the Space as `app.py` and set the Space variable `FLEXVAR_MODEL` to a
FlexVAR pipeline on the Hub (docs/app.md).
"""

from __future__ import annotations

import argparse
import html
import logging
import os
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import torch
from PIL import Image

from flexvar_hf import FlexVARImg2ImgPipeline, FlexVARInpaintPipeline, FlexVAROutpaintPipeline, FlexVARPipeline

SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "models" / "flexvar-digits"
MODEL_ENV = "FLEXVAR_MODEL"  # the default of --model, e.g. set as a Space variable
# Width:height presets; the short side is the model's training size.
ASPECT_RATIOS = {"1:1": (1, 1), "4:3": (4, 3), "3:4": (3, 4), "16:9": (16, 9), "9:16": (9, 16), "2:1": (2, 1),
                 "1:2": (1, 2)}
PLACEMENTS = ("centre", "top-left", "top-right", "bottom-left", "bottom-right", "offset")
MAX_IMAGES_PER_REQUEST = 16  # one batch: more classes x images per class are refused instead of running out of memory
MAX_SIDE_FACTOR = 4  # sizes up to 4x the training size; larger uploads are scaled down to it
SEED_RANGE = 2**31
logger = logging.getLogger("flexvar_app")


# ----------------------------------------------------------------------------------------------------------------
# Requests


def whole_number(value, name: str) -> int:
    """A page number (int, or a float from a number field) -> int; ValueError for an empty or fractional value."""
    if value is None or value == "":
        raise ValueError(f"{name} is empty; enter a whole number.")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{name} must be a whole number, got {value}.")
    return int(value)


@dataclass(frozen=True)
class SamplingSettings:
    """
    The sampling controls shared by every tab.

    Args:
        steps: Number of scales; None: the pipeline's default schedule for the size.
        guidance_scale: Classifier-free guidance (1 disables it); guidance_schedule: "linear" or "constant", None:
            the model's own.
        top_k (0 disables it), top_p (0 or 1 disables it): Sampling filters.
        images_per_class: Outputs per class (and input image).
        seed: Seed of the request's generator; None draws a random one per request (reported with the result).
    """

    steps: int | None = None
    guidance_scale: float = 3.5
    guidance_schedule: str | None = None
    top_k: int = 900
    top_p: float = 0.95
    images_per_class: int = 1
    seed: int | None = 0

    @classmethod
    def from_page(cls, steps, guidance_scale, guidance_schedule, top_k, top_p, images_per_class, seed, random_seed):
        """The page's values (number fields give floats, steps 0 = the default schedule) -> settings."""
        steps = whole_number(steps, "Steps")
        return cls(
            steps=steps or None,
            guidance_scale=float(guidance_scale),
            guidance_schedule=guidance_schedule,
            top_k=whole_number(top_k, "Top-k"),
            top_p=float(top_p),
            images_per_class=whole_number(images_per_class, "Images per class"),
            seed=None if random_seed else whole_number(seed, "Seed"),
        )

    def pipeline_kwargs(self) -> dict:
        """Keyword arguments of every pipeline call, but the generator."""
        return dict(num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                    guidance_schedule=self.guidance_schedule, top_k=self.top_k, top_p=self.top_p,
                    num_images_per_prompt=self.images_per_class)


def aspect_size(ratio: str, short_side: int, factor: int) -> tuple[int, int]:
    """(height, width) of a width:height preset: the short side `short_side`, the long one rounded to a multiple of
    `factor`: ("16:9", 256, 16) -> (256, 448), ("1:2", 96, 8) -> (192, 96)."""
    if ratio not in ASPECT_RATIOS:
        raise ValueError(f"Aspect ratio must be one of {list(ASPECT_RATIOS)}, got {ratio!r}.")
    ratio_width, ratio_height = ASPECT_RATIOS[ratio]
    long_side = max(short_side, round(short_side * max(ratio_width, ratio_height) / min(ratio_width, ratio_height)
                                      / factor) * factor)
    return (long_side, short_side) if ratio_height > ratio_width else (short_side, long_side)


def placement_offset(
    placement: str, image_size: tuple[int, int], canvas_size: tuple[int, int], offset: tuple[int, int] | None = None
) -> tuple[int, int] | None:
    """`(top, left)` in pixels of an image of `image_size` on a canvas of `canvas_size` for a placement of
    `PLACEMENTS`; None for "centre" (the out-painting pipeline's default) and `offset` for "offset". The pipeline
    checks that the image fits."""
    if placement not in PLACEMENTS:
        raise ValueError(f"Placement must be one of {PLACEMENTS}, got {placement!r}.")
    if placement == "centre":
        return None
    if placement == "offset":
        return offset
    bottom, right = canvas_size[0] - image_size[0], canvas_size[1] - image_size[1]
    vertical, horizontal = placement.split("-")
    return (0 if vertical == "top" else bottom), (0 if horizontal == "left" else right)


def editor_image_and_mask(editor: dict | None) -> tuple[Image.Image, Image.Image]:
    """
    An image editor value `{"background", "layers", "composite"}` (PIL images) -> (RGB image, L mask): the
    background (transparency on white), and white wherever a layer was painted (alpha > 0), at the background's
    size.
    """
    background = (editor or {}).get("background")
    if background is None:
        raise ValueError("Upload an image to in-paint first (or send one from the Generate tab).")
    image = flatten(background)
    mask = Image.new("L", image.size, 0)
    for layer in editor.get("layers") or []:
        alpha = layer.convert("RGBA").getchannel("A").resize(image.size, Image.NEAREST)
        mask.paste(255, mask=alpha.point(lambda value: 255 if value > 0 else 0))
    return image, mask


def flatten(image: Image.Image) -> Image.Image:
    """Any PIL image -> RGB, transparent areas on white."""
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        canvas = Image.new("RGB", image.size, "white")
        canvas.paste(image, mask=image.getchannel("A"))
        return canvas
    return image.convert("RGB")


def gallery_image(gallery: Sequence | None, index: int | None) -> Image.Image:
    """The selected (else the first) image of a gallery value (a list of `(image, caption)` or images)."""
    if not gallery:
        raise ValueError("There is no result to send yet: generate an image first.")
    item = gallery[index if index is not None and 0 <= index < len(gallery) else 0]
    image = item[0] if isinstance(item, (tuple, list)) else item
    return flatten(image if isinstance(image, Image.Image) else Image.open(image))


# ----------------------------------------------------------------------------------------------------------------
# Handlers


class FlexVARDemo:
    """
    The demo's model and handlers: one FlexVARPipeline and the img2img / in-paint / out-paint pipelines made from it
    with `from_pipe` (shared modules). Each handler makes one pipeline call and returns `(gallery, settings)`: a
    list of `(PIL image, caption)` and a Markdown line of the effective settings. Calls run one at a time (the
    pipelines share their scheduler).

    Args:
        pipe (`FlexVARPipeline`): The loaded pipeline, on its device.
    """

    def __init__(self, pipe: FlexVARPipeline):
        self.pipe = pipe
        self.img2img_pipe = FlexVARImg2ImgPipeline.from_pipe(pipe)
        self.inpaint_pipe = FlexVARInpaintPipeline.from_pipe(pipe)
        self.outpaint_pipe = FlexVAROutpaintPipeline.from_pipe(pipe)
        for each in (self.pipe, self.img2img_pipe, self.inpaint_pipe, self.outpaint_pipe):
            each.set_progress_bar_config(disable=True)
        self.lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, model: str | Path, device: str = "cpu", dtype: str = "float32") -> FlexVARDemo:
        """Load a FlexVARPipeline folder or Hub id onto `device` in `dtype` ("float32", "float16", "bfloat16")."""
        pipe = FlexVARPipeline.from_pretrained(str(model), dtype=getattr(torch, dtype)).to(device)
        return cls(pipe)

    # ------------------------------------------------------------------------------------------------------------
    # Model facts the page shows

    @property
    def factor(self) -> int:
        """Pixels per token side: sizes are multiples of it."""
        return self.pipe.vae_scale_factor

    @property
    def default_size(self) -> int:
        return self.pipe.default_sample_size

    @property
    def max_size(self) -> int:
        return MAX_SIDE_FACTOR * self.default_size

    @property
    def class_choices(self) -> list[str]:
        """"id: names" for every class ("207: golden retriever"), or the bare ids of a model without names."""
        names = self.pipe.id2label
        return [f"{class_id}: {names[class_id]}" if class_id in names else str(class_id)
                for class_id in range(self.pipe.transformer.config.num_classes)]

    def class_ids(self, classes: str | Sequence[str | int] | None) -> list[int]:
        """Picked classes ("id: names" choices, typed ids or names) -> class ids; ValueError for none or unknown
        names (the pipeline checks the ids' range)."""
        picked = [classes] if isinstance(classes, (str, int)) else list(classes or [])
        if not picked:
            raise ValueError("Pick at least one class (type a class name or id to search).")
        ids = []
        for value in picked:
            text = str(value).strip()
            match = re.fullmatch(r"(\d+)(:.*)?", text, flags=re.DOTALL)
            ids.append(int(match.group(1)) if match else self.pipe.get_label_ids(text)[0])
        return ids

    def class_caption(self, class_id: int) -> str:
        return self.pipe.id2label.get(class_id, f"class {class_id}")

    # ------------------------------------------------------------------------------------------------------------
    # Tabs

    def generate(self, classes, height, width, sampling: SamplingSettings, progress: Callable | None = None):
        """Generate tab: `pipe(classes, height, width, ...)`."""
        height, width = whole_number(height, "Height"), whole_number(width, "Width")
        return self.run(self.pipe, classes, sampling, progress, [], height=height, width=width)

    def refine(self, image, classes, strength, sampling: SamplingSettings, progress: Callable | None = None):
        """Refine tab: `img2img_pipe(image, classes, strength, ...)`, the output at the image's size (multiples of
        the token size, scaled down to `max_size`)."""
        if image is None:
            raise ValueError("Upload an image to refine first (or send one from the Generate tab).")
        image = self.fit(flatten(image))
        strength = float(strength)
        notes = [f"strength {strength:g}"]
        return self.run(self.img2img_pipe, classes, sampling, progress, notes, image=image, strength=strength)

    def inpaint(self, editor, classes, mask_threshold, keep_unmasked, sampling: SamplingSettings,
                progress: Callable | None = None):
        """In-paint tab: the painted area of the editor's image regenerated, `inpaint_pipe(image, mask, ...)`."""
        image, mask = editor_image_and_mask(editor)
        image, mask = self.fit(image), self.fit(mask)
        notes = [f"mask threshold {float(mask_threshold):g}"] + (["unmasked pixels kept"] if keep_unmasked else [])
        return self.run(self.inpaint_pipe, classes, sampling, progress, notes, image=image, mask_image=mask,
                        mask_threshold=float(mask_threshold), preserve_unmasked=bool(keep_unmasked))

    def outpaint(self, image, classes, height, width, placement, offset_top, offset_left, keep_unmasked,
                 sampling: SamplingSettings, progress: Callable | None = None):
        """Out-paint tab: the image placed on a `height` x `width` canvas (`placement`, `PLACEMENTS`), the rest
        generated: `outpaint_pipe(image, classes, height, width, offset, ...)`."""
        if image is None:
            raise ValueError("Upload an image to out-paint first (or send one from the Generate tab).")
        image = self.fit(flatten(image))
        height, width = whole_number(height, "Canvas height"), whole_number(width, "Canvas width")
        offset = None
        if placement == "offset":
            offset = (whole_number(offset_top, "Offset top"), whole_number(offset_left, "Offset left"))
        image_size = self.outpaint_pipe.output_size(image.height, image.width)  # the image's sides as generated
        offset = placement_offset(placement, image_size, (height, width), offset)
        notes = [f"{height}x{width} canvas", f"image {image_size[0]}x{image_size[1]} at {placement}"
                 + (f" {offset}" if placement == "offset" else "")]
        notes += ["image pixels kept"] if keep_unmasked else []
        return self.run(self.outpaint_pipe, classes, sampling, progress, notes, image=image, height=height,
                        width=width, offset=offset, preserve_unmasked=bool(keep_unmasked))

    def fit(self, image: Image.Image) -> Image.Image:
        """Scale an upload down (aspect kept) so that its long side is at most `max_size`."""
        scale = self.max_size / max(image.size)
        if scale >= 1:
            return image
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        return image.resize(size, Image.NEAREST if image.mode == "L" else Image.LANCZOS)

    # ------------------------------------------------------------------------------------------------------------
    # The pipeline call shared by the tabs

    def run(self, pipeline: FlexVARPipeline, classes, sampling: SamplingSettings, progress: Callable | None,
            notes: list[str], **inputs) -> tuple[list[tuple[Image.Image, str]], str]:
        """Call `pipeline(class_labels=..., **inputs, **sampling)` with a seeded generator and the progress callback;
        returns the gallery and the settings line."""
        class_ids = self.class_ids(classes)
        if len(class_ids) * sampling.images_per_class > MAX_IMAGES_PER_REQUEST:
            raise ValueError(f"{len(class_ids)} classes x {sampling.images_per_class} images per class is more than "
                             f"{MAX_IMAGES_PER_REQUEST} images per request; pick fewer.")
        seed = random.randrange(SEED_RANGE) if sampling.seed is None else sampling.seed
        generator = torch.Generator(self.pipe.device).manual_seed(seed)
        callback = None if progress is None else scale_progress(progress)
        with self.lock:
            start = time.perf_counter()
            images = pipeline(class_labels=class_ids, **inputs, **sampling.pipeline_kwargs(), generator=generator,
                              callback_on_step_end=callback).images
            seconds = time.perf_counter() - start
            scales = list(pipeline.scheduler.scales)
        captions = [self.class_caption(class_id) for class_id in class_ids for _ in range(sampling.images_per_class)]
        settings = self.settings_line(notes, scales, images, sampling, seed, seconds)
        return list(zip(images, captions)), settings

    def settings_line(self, notes, scales, images, sampling: SamplingSettings, seed: int, seconds: float) -> str:
        """The effective settings of a call: output size, scales used (token grids), guidance, filters, seed."""
        schedule = sampling.guidance_schedule or self.pipe.scheduler.config.guidance_schedule
        guidance = "off" if sampling.guidance_scale == 1 else f"{sampling.guidance_scale:g} ({schedule})"
        grids = ", ".join(f"{h}x{w}" for h, w in scales)
        parts = notes + [
            f"output {images[0].height}x{images[0].width}",
            f"{len(scales)} scales (token grids {grids})",
            f"guidance {guidance}",
            f"top-k {sampling.top_k}, top-p {sampling.top_p:g}",
            f"seed {seed}",
            f"{len(images)} image{'s' if len(images) > 1 else ''} in {seconds:.1f} s",
        ]
        return " · ".join(parts)


def scale_progress(progress: Callable) -> Callable:
    """A `callback_on_step_end` that reports each finished scale as `progress((done, total), desc=...)`."""

    def callback(pipe, step_index, timestep, callback_kwargs):
        scales = pipe.scheduler.scales
        height, width = scales[step_index]
        progress((step_index + 1, len(scales)), desc=f"scale {step_index + 1} of {len(scales)} ({height}x{width})")
        return callback_kwargs

    return callback


@contextmanager
def readable_errors() -> Iterator[None]:
    """Turn a ValueError / TypeError (bad input) into a `gr.Error`, which the page shows as its message."""
    try:
        yield
    except (ValueError, TypeError) as error:
        logger.info("Refused a request: %s", error)
        raise gr.Error(html.escape(str(error)), print_exception=False) from None


# ----------------------------------------------------------------------------------------------------------------
# Page


@dataclass
class TabParts:
    """What a tab gives the page: its button, its inputs by handler argument name, and its results."""

    button: gr.Button
    inputs: dict
    gallery: gr.Gallery
    settings: gr.Markdown

    def wire(self, handler: Callable, sampling_inputs: dict) -> None:
        """Run `handler(**tab values, sampling=SamplingSettings, progress=...)` on a click, queued one request at a
        time with every other pipeline call (shared concurrency id)."""

        # Gradio passes the values of a set of inputs as one dict, and finds its progress tracker by this default.
        def run(values: dict, progress=gr.Progress()):  # noqa: B008
            with readable_errors():
                sampling = SamplingSettings.from_page(**by_name(sampling_inputs, values))
                return handler(**by_name(self.inputs, values), sampling=sampling, progress=progress)

        self.button.click(run, inputs={*self.inputs.values(), *sampling_inputs.values()},
                          outputs=[self.gallery, self.settings], concurrency_limit=1, concurrency_id="pipeline",
                          api_name=handler.__name__)


def by_name(fields: dict, values: dict) -> dict:
    """{argument name: component} and {component: value} -> {argument name: value}."""
    return {name: values[field] for name, field in fields.items()}


def class_picker(demo: FlexVARDemo, value: list[str], name: str) -> gr.Dropdown:
    return gr.Dropdown(demo.class_choices, value=value, multiselect=True, allow_custom_value=True, filterable=True,
                       label="Classes", info="Type to search class names or ids; several classes give several images.",
                       elem_id=f"{name}-classes")


def image_input(name: str) -> gr.Image:
    return gr.Image(type="pil", image_mode="RGB", label="Image", sources=["upload", "clipboard"],
                    elem_id=f"{name}-image")


def size_fields(demo: FlexVARDemo, height: int, width: int, name: str, prefix: str = "") -> list[gr.Number]:
    info = f"pixels, a multiple of {demo.factor}, at most {demo.max_size}"
    return [gr.Number(value, label=f"{prefix}{side}".capitalize(), info=info, precision=0, step=demo.factor,
                      minimum=demo.factor, maximum=demo.max_size, elem_id=f"{name}-{side}")
            for side, value in (("height", height), ("width", width))]


def run_button(label: str, name: str) -> gr.Button:
    return gr.Button(label, variant="primary", elem_id=f"{name}-button")


def results(name: str, columns: int = 2) -> tuple[gr.Gallery, gr.Markdown]:
    gallery = gr.Gallery(label="Results", format="png", columns=columns, height=340, object_fit="contain",
                         buttons=["download", "download_all", "fullscreen"], elem_id=f"{name}-gallery",
                         interactive=False)
    return gallery, gr.Markdown(elem_id=f"{name}-settings")


def generate_tab(demo: FlexVARDemo, classes: list[str]) -> tuple[TabParts, dict, gr.State]:
    """The Generate tab; also returns its "send the selected image" buttons by target tab and the selected index."""
    picker = class_picker(demo, classes, "generate")
    aspect = gr.Radio(list(ASPECT_RATIOS), value="1:1", label="Aspect ratio (width:height)")
    with gr.Row():
        height, width = size_fields(demo, demo.default_size, demo.default_size, "generate")
    button = run_button("Generate", "generate")
    gallery, settings = results("generate", columns=4)
    with gr.Row():
        send_buttons = {tab: gr.Button(f"{label} the selected image", size="sm")
                        for tab, label in (("refine", "Refine"), ("inpaint", "In-paint"), ("outpaint", "Out-paint"))}
    selected = gr.State(None)
    aspect.change(lambda ratio: aspect_size(ratio, demo.default_size, demo.factor), aspect, [height, width],
                  queue=False, api_visibility="private")
    gallery.select(selected_index, None, selected, queue=False, api_visibility="private")
    gallery.change(lambda: None, None, selected, queue=False, api_visibility="private")
    parts = TabParts(button, dict(classes=picker, height=height, width=width), gallery, settings)
    return parts, send_buttons, selected


def refine_tab(demo: FlexVARDemo, classes: list[str]) -> TabParts:
    with gr.Row():
        with gr.Column():
            image = image_input("refine")
            picker = class_picker(demo, classes, "refine")
            strength = gr.Slider(0, 1, value=0.6, step=0.05, label="Strength",
                                 info="0 keeps every scale of the image, 1 makes a new image")
            button = run_button("Refine", "refine")
        with gr.Column():
            gallery, settings = results("refine")
    return TabParts(button, dict(image=image, classes=picker, strength=strength), gallery, settings)


def inpaint_tab(demo: FlexVARDemo, classes: list[str]) -> TabParts:
    with gr.Row():
        with gr.Column():
            editor = gr.ImageEditor(
                type="pil", label="Image: paint over the area to regenerate", sources=["upload", "clipboard"],
                transforms=(), layers=False, brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                eraser=gr.Eraser(), canvas_size=(demo.default_size, demo.default_size), elem_id="inpaint-editor")
            picker = class_picker(demo, classes, "inpaint")
            with gr.Row():
                threshold = gr.Slider(0.05, 1, value=0.5, step=0.05, label="Mask threshold",
                                      info="lower regenerates more context at coarse scales")
                keep = gr.Checkbox(False, label="Keep unmasked pixels")
            button = run_button("In-paint", "inpaint")
        with gr.Column():
            gallery, settings = results("inpaint")
    inputs = dict(editor=editor, classes=picker, mask_threshold=threshold, keep_unmasked=keep)
    return TabParts(button, inputs, gallery, settings)


def outpaint_tab(demo: FlexVARDemo, classes: list[str]) -> TabParts:
    with gr.Row():
        with gr.Column():
            image = image_input("outpaint")
            picker = class_picker(demo, classes, "outpaint")
            with gr.Row():
                height, width = size_fields(demo, demo.default_size, 2 * demo.default_size, "outpaint", "canvas ")
            placement = gr.Radio(list(PLACEMENTS), value="centre", label="Image placement")
            with gr.Row():
                top = gr.Number(0, label="Offset top", precision=0, step=demo.factor)
                left = gr.Number(0, label="Offset left", precision=0, step=demo.factor)
            keep = gr.Checkbox(False, label="Keep the image's pixels")
            button = run_button("Out-paint", "outpaint")
        with gr.Column():
            gallery, settings = results("outpaint")
    inputs = dict(image=image, classes=picker, height=height, width=width, placement=placement, offset_top=top,
                  offset_left=left, keep_unmasked=keep)
    return TabParts(button, inputs, gallery, settings)


def sampling_panel(demo: FlexVARDemo) -> dict:
    """The sampling settings every tab uses, by `SamplingSettings.from_page` argument name."""
    with gr.Accordion("Sampling (all tabs)", open=True):
        fields = dict(
            images_per_class=gr.Slider(1, 8, value=1, step=1, label="Images per class", elem_id="images-per-class"),
            steps=gr.Slider(0, max(1, demo.max_size // demo.factor), value=0, step=1, label="Steps (scales)",
                            info="0: the model's default schedule for the size"),
            guidance_scale=gr.Slider(1, 10, value=3.5, step=0.1, label="Guidance scale", info="1: off"),
            guidance_schedule=gr.Radio(["linear", "constant"], value=demo.pipe.scheduler.config.guidance_schedule,
                                       label="Guidance schedule",
                                       info="linear ramps up from 1; the model's own is preselected"),
            top_k=gr.Number(900, label="Top-k", precision=0, minimum=0, info="0: off"),
            top_p=gr.Slider(0, 1, value=0.95, step=0.01, label="Top-p", info="0 or 1: off"),
        )
        with gr.Row():
            fields["seed"] = gr.Number(0, label="Seed", precision=0, minimum=0)
            fields["random_seed"] = gr.Checkbox(False, label="Random seed")
    return fields


def build_demo(demo: FlexVARDemo, title: str = "FlexVAR") -> gr.Blocks:
    """The page: Generate, Refine, In-paint and Out-paint tabs beside the sampling settings shared by all tabs."""
    pipe, size = demo.pipe, demo.default_size
    first_classes = demo.class_choices[:4]
    with gr.Blocks(title=title) as page:
        gr.Markdown(f"# FlexVAR: {title}\nScale-wise autoregressive generation "
                    f"([FlexVAR](https://arxiv.org/abs/2502.20313)): {pipe.transformer.config.num_classes} classes, "
                    f"trained at {size}x{size}, any size in multiples of {demo.factor} pixels · {pipe.device} · "
                    f"{str(pipe.transformer.dtype).removeprefix('torch.')}")
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Tabs() as tabs:
                    with gr.Tab("Generate", id="generate"):
                        generate, send_buttons, selected = generate_tab(demo, first_classes)
                    with gr.Tab("Refine", id="refine"):
                        refine = refine_tab(demo, first_classes[:1])
                    with gr.Tab("In-paint", id="inpaint"):
                        inpaint = inpaint_tab(demo, first_classes[:1])
                    with gr.Tab("Out-paint", id="outpaint"):
                        outpaint = outpaint_tab(demo, first_classes[:1])
            with gr.Column(scale=2):
                sampling = sampling_panel(demo)

        for parts, handler in ((generate, demo.generate), (refine, demo.refine), (inpaint, demo.inpaint),
                               (outpaint, demo.outpaint)):
            parts.wire(handler, sampling)
        targets = dict(refine=(refine.inputs["image"], lambda image: image),
                       outpaint=(outpaint.inputs["image"], lambda image: image),
                       inpaint=(inpaint.inputs["editor"],
                                lambda image: {"background": image, "layers": [], "composite": image}))
        for tab, button in send_buttons.items():
            component, value = targets[tab]
            button.click(send_selected(value, tab), [generate.gallery, selected], [component, tabs], queue=False,
                         api_visibility="private")
    return page


def selected_index(event: gr.SelectData) -> int:
    return event.index


def send_selected(value: Callable, tab: str) -> Callable:
    """A click handler that puts the selected Generate result into another tab's input and opens that tab."""

    def send(gallery, index):
        with readable_errors():
            return value(gallery_image(gallery, index)), gr.Tabs(selected=tab)

    return send


# ----------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get(MODEL_ENV) or None,
                        help=f"A FlexVARPipeline folder or Hub id (default: ${MODEL_ENV}, else the shipped "
                             f"{SHIPPED_MODEL.name}).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="Default: cuda if available, else cpu.")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="Weights and compute dtype (float32 on the CPU).")
    parser.add_argument("--share", action="store_true", help="Also serve on a public gradio.live link.")
    parser.add_argument("--port", type=int, default=None,
                        help="Local port (default: $GRADIO_SERVER_PORT, else 7860 or the next free one).")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(message)s")
    logger.setLevel(logging.INFO)
    model = args.model or SHIPPED_MODEL
    if args.model is None and not (SHIPPED_MODEL / "model_index.json").is_file():
        print(f"No model at {SHIPPED_MODEL}; pass --model or set {MODEL_ENV} (a FlexVAR folder or Hub id).",
              file=sys.stderr)
        return 2
    demo = FlexVARDemo.from_pretrained(model, args.device, args.dtype)
    title = Path(str(model)).name if Path(str(model)).exists() else str(model)
    page = build_demo(demo, title=title)
    page.queue(default_concurrency_limit=1).launch(server_port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
