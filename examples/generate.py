"""Generate a PNG grid with a FlexVARPipeline: several classes at several sizes, aspect ratios and step counts.

    python examples/generate.py --model path/or/hub-id --classes 0 1 2 --sizes 256x256 256x512 --steps 10 13
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from flexvar_hf import FlexVARPipeline


def parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes are HEIGHTxWIDTH in pixels, e.g. 256x512; got {text!r}") from None
    return height, width


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A FlexVARPipeline folder or Hub id.")
    parser.add_argument("--classes", nargs="+", default=None, help="Class ids or names (default: the first 4).")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[(256, 256)], help="HEIGHTxWIDTH list.")
    parser.add_argument("--steps", nargs="+", type=int, default=[None], help="Step counts (default: per size).")
    parser.add_argument("--guidance_scale", type=float, default=None, help="Default: the pipeline's.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default="outputs/flexvar_grid.png", help="Where to write the PNG grid.")
    return parser.parse_args(argv)


def grid(rows: list[list[Image.Image]], pad: int = 4) -> Image.Image:
    """Paste rows of images (each row may hold another size) onto one white canvas."""
    width = max(sum(im.width for im in row) + pad * (len(row) + 1) for row in rows)
    height = sum(max(im.height for im in row) for row in rows) + pad * (len(rows) + 1)
    canvas = Image.new("RGB", (width, height), "white")
    top = pad
    for row in rows:
        left = pad
        for image in row:
            canvas.paste(image, (left, top))
            left += image.width + pad
        top += max(im.height for im in row) + pad
    return canvas


def main(argv=None) -> int:
    args = parse_args(argv)
    pipe = FlexVARPipeline.from_pretrained(args.model).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    classes = args.classes or list(range(min(4, pipe.transformer.config.num_classes)))
    classes = [int(c) if str(c).isdigit() else c for c in classes]
    extra = {} if args.guidance_scale is None else {"guidance_scale": args.guidance_scale}
    rows, start = [], time.perf_counter()
    for height, width in args.sizes:
        for steps in args.steps:
            generator = torch.Generator(args.device).manual_seed(args.seed)
            images = pipe(classes, height=height, width=width, num_inference_steps=steps, generator=generator,
                          **extra).images
            rows.append(images)
            print(f"{height}x{width}, {steps or 'default'} steps: {len(images)} images")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    grid(rows).save(output)
    elapsed = time.perf_counter() - start
    print(f"Wrote {output.resolve()} ({len(rows)} rows x {len(classes)} classes) in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
