"""Generate a PNG grid with a FlexVARPipeline: several classes at several sizes, aspect ratios and step counts.

    python examples/generate.py                      # the small digits model shipped in models/flexvar-digits
    python examples/generate.py --model path/or/hub-id --classes 0 1 2 --sizes 256x256 256x512 --steps 10 13

With no `--model`, the shipped digits model (trained by this repository's scripts, last at 96x96, see its README)
draws the ten digits at 96x96 with 6 and 10 steps, at 128x128 and, zero-shot, at 96x192 (1:2), with constant
guidance (its setting, from its scheduler config), on the CPU in well under a minute. Each row of the grid is one
size and step count, labelled on the left.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from flexvar_hf import FlexVARPipeline

SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "models" / "flexvar-digits"
# (height, width, steps, classes) rows of the default grid for the shipped model; None steps: the pipeline's
# default for the size.
SHIPPED_ROWS = (
    (96, 96, 6, tuple(range(10))),
    (96, 96, 10, tuple(range(10))),
    (128, 128, 10, tuple(range(10))),
    (96, 192, 10, tuple(range(10))),
)
LABEL_WIDTH = 112
PAD = 4


def parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes are HEIGHTxWIDTH in pixels, e.g. 256x512; got {text!r}") from None
    return height, width


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help=f"A FlexVARPipeline folder or Hub id (default: the shipped {SHIPPED_MODEL.name}).")
    parser.add_argument("--classes", nargs="+", default=None,
                        help="Class ids or names for every row (default: the digits for the shipped model's rows, "
                             "else the first 4 classes).")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=None,
                        help="HEIGHTxWIDTH list (default: 256x256; for the shipped model its own rows).")
    parser.add_argument("--steps", nargs="+", type=int, default=None,
                        help="Step counts, each combined with each size (default: the pipeline's per size).")
    parser.add_argument("--guidance_scale", type=float, default=None, help="Default: the pipeline's.")
    parser.add_argument("--guidance_schedule", default=None, choices=["linear", "constant"],
                        help="Default: the model's own (its scheduler config; 'constant' for the shipped model).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="Weights and compute dtype (float32 on the CPU).")
    parser.add_argument("--output", default="outputs/flexvar_grid.png", help="Where to write the PNG grid.")
    return parser.parse_args(argv)


def plan_rows(args: argparse.Namespace, shipped: bool, default_classes: list) -> list[tuple]:
    """(height, width, steps, classes) of every row: the shipped model's rows, else the product of --sizes and
    --steps, each with `default_classes` (or --classes)."""
    classes = [int(c) if str(c).isdigit() else c for c in args.classes] if args.classes else None
    if shipped and args.sizes is None and args.steps is None:
        return [(height, width, steps, classes or list(row_classes)) for height, width, steps, row_classes in
                SHIPPED_ROWS]
    sizes = args.sizes or [(256, 256)]
    steps = args.steps or [None]
    return [(height, width, step, classes or default_classes) for height, width in sizes for step in steps]


def grid(rows: list[list[Image.Image]], captions: list[str] | None = None, pad: int = PAD) -> Image.Image:
    """Paste rows of images (each row may hold another size) onto one white canvas, with a caption column on the
    left when `captions` are given. Size: width `LABEL_WIDTH + pad + max(row widths)` (no caption column without
    captions), height `sum(row heights) + pad * (rows + 1)`, a row's width being `sum(widths) + pad * (n + 1)`."""
    left_margin = LABEL_WIDTH + pad if captions else 0
    width = left_margin + max(sum(im.width for im in row) + pad * (len(row) + 1) for row in rows)
    height = sum(max(im.height for im in row) for row in rows) + pad * (len(rows) + 1)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    top = pad
    for index, row in enumerate(rows):
        row_height = max(im.height for im in row)
        if captions:
            draw.multiline_text((pad, top + row_height // 2 - 12), captions[index], fill="black")
        left = left_margin + pad
        for image in row:
            canvas.paste(image, (left, top))
            left += image.width + pad
        top += row_height + pad
    return canvas


def main(argv=None) -> int:
    args = parse_args(argv)
    shipped = args.model is None
    model = str(SHIPPED_MODEL) if shipped else args.model
    if shipped and not (SHIPPED_MODEL / "model_index.json").is_file():
        raise SystemExit(f"The shipped model is missing at {SHIPPED_MODEL}; pass --model PATH_OR_HUB_ID.")
    start = time.perf_counter()
    pipe = FlexVARPipeline.from_pretrained(model, dtype=getattr(torch, args.dtype)).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    default_classes = list(range(10 if shipped else min(4, pipe.transformer.config.num_classes)))
    extra = {name: value for name, value in [("guidance_scale", args.guidance_scale),
                                             ("guidance_schedule", args.guidance_schedule)] if value is not None}

    rows, captions, num_images = [], [], 0
    for height, width, steps, classes in plan_rows(args, shipped, default_classes):
        generator = torch.Generator(args.device).manual_seed(args.seed)
        try:
            images = pipe(classes, height=height, width=width, num_inference_steps=steps, generator=generator,
                          **extra).images
        except ValueError as error:  # the pipeline's message says which argument and what it accepts
            raise SystemExit(f"error: {height}x{width}, {steps} steps, classes {classes}: {error}") from None
        used_steps = len(pipe.scheduler.scales)
        rows.append(images)
        captions.append(f"{height}x{width}\n{used_steps} steps")
        num_images += len(images)
        print(f"{height}x{width}, {used_steps} steps: classes {classes}")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    grid(rows, captions).save(output)
    elapsed = time.perf_counter() - start
    print(f"Wrote {output.resolve()} ({len(rows)} rows, {num_images} images) in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
