"""Render a class-conditional "digits" image dataset offline, as an imagefolder.

Ten classes, the digits 0-9, drawn with the fonts that ship with matplotlib (21 faces of DejaVu Sans, Sans Mono,
Serif, STIX and Computer Modern; Pillow's bundled default font when matplotlib is missing) in random colours,
sizes, positions, rotations, stroke widths and aspect ratios, over random textured backgrounds (gradients, stripes,
checkerboards, smooth noise, blotches). Colours and backgrounds carry no class information, so a model has to
learn each digit's shape to do well.

    python examples/make_digits_dataset.py --output_dir data/digits128 --resolution 128
    python examples/make_digits_dataset.py --output_dir data/digits64 --resolution 64 --train_per_class 2000

writes `OUTPUT_DIR/train/<digit>/<digit>_<index>.png` and `OUTPUT_DIR/test/<digit>/...` (a held-out split), which
`datasets.load_dataset("imagefolder", data_dir=OUTPUT_DIR)` reads with labels 0-9, plus `digits_config.json`
with the arguments. Every image depends only on `--seed`, its split and its index, so the output is the same
for any number of worker processes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "test")
# Faces of matplotlib's bundled fonts whose digits are ordinary lining figures.
MATPLOTLIB_FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmss10.ttf",
    "cmti10.ttf",
    "cmtt10.ttf",
)
RENDER_SIZE = 160  # the glyph is drawn at this font size, then rotated and resized to its place
SPLIT_SEED_OFFSET = {"train": 0, "test": 1}


def font_files() -> list[str]:
    """Paths of matplotlib's digit fonts, or `[""]` (Pillow's bundled default font) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return [""]
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    found = [str(folder / name) for name in MATPLOTLIB_FONTS if (folder / name).is_file()]
    return found or [""]


@lru_cache(maxsize=64)
def load_font(path: str) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if path:
        return ImageFont.truetype(path, RENDER_SIZE)
    return ImageFont.load_default(size=RENDER_SIZE)


# ----------------------------------------------------------------------------------------------------------------
# Backgrounds: float32 (H, W, 3) arrays in [0, 1]


def random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 1.0, size=3).astype(np.float32)


def smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """Noise of `cells` x `cells` random values upsampled bicubic to `size`: a smooth random field in [0, 1]."""
    low = (rng.uniform(0, 255, size=(cells, cells, channels))).astype(np.uint8)
    mode = "RGB" if channels == 3 else "L"
    field = Image.fromarray(low if channels == 3 else low[..., 0], mode).resize((size, size), Image.BICUBIC)
    array = np.asarray(field, dtype=np.float32) / 255.0
    return array if channels == 3 else array[..., None]


def blend(colour_a: np.ndarray, colour_b: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """(H, W, 1) weight in [0, 1] between two colours -> (H, W, 3)."""
    return colour_a * (1 - weight) + colour_b * weight


def make_background(rng: np.random.Generator, size: int) -> np.ndarray:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    colour_a, colour_b = random_colour(rng), random_colour(rng)
    if rng.uniform() < 0.5:  # low-contrast textures half the time
        colour_b = np.clip(colour_a + rng.uniform(-0.25, 0.25, size=3), 0, 1).astype(np.float32)
    kind = rng.integers(6)
    if kind == 0:  # flat
        background = np.broadcast_to(colour_a, (size, size, 3)).copy()
    elif kind == 1:  # linear gradient
        angle = rng.uniform(0, 2 * math.pi)
        ramp = xs * math.cos(angle) + ys * math.sin(angle)
        ramp = (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1e-6)
        background = blend(colour_a, colour_b, ramp[..., None])
    elif kind == 2:  # stripes, hard or soft
        angle = rng.uniform(0, math.pi)
        frequency = rng.uniform(2, 12)
        wave = np.sin(2 * math.pi * frequency * (xs * math.cos(angle) + ys * math.sin(angle)) + rng.uniform(0, 6.3))
        weight = (wave > 0).astype(np.float32) if rng.uniform() < 0.5 else (wave + 1) / 2
        background = blend(colour_a, colour_b, weight[..., None])
    elif kind == 3:  # checkerboard
        cells = rng.uniform(2, 10)
        weight = ((np.floor(xs * cells) + np.floor(ys * cells)) % 2).astype(np.float32)
        background = blend(colour_a, colour_b, weight[..., None])
    elif kind == 4:  # smooth coloured noise
        background = smooth_noise(rng, size, int(rng.integers(2, 10)), 3)
        background = 0.3 + 0.7 * background * rng.uniform(0.3, 1.0) + colour_a * 0.3 - 0.15
    else:  # blotches: a thresholded smooth field
        field = smooth_noise(rng, size, int(rng.integers(3, 9)), 1)
        background = blend(colour_a, colour_b, (field > rng.uniform(0.35, 0.65)).astype(np.float32))
    noise = rng.uniform(0.0, 0.05)  # fine grain
    background = background + rng.normal(0.0, noise, size=(size, size, 1)).astype(np.float32)
    return np.clip(background, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Digits


def glyph_mask(digit: int, font_path: str, stroke: int) -> Image.Image:
    """The digit drawn white on black ("L"), cropped to its ink."""
    font = load_font(font_path)
    canvas = Image.new("L", (RENDER_SIZE * 2, RENDER_SIZE * 2), 0)
    draw = ImageDraw.Draw(canvas)
    draw.text((RENDER_SIZE // 2, RENDER_SIZE // 4), str(digit), font=font, fill=255, stroke_width=stroke,
              stroke_fill=255)
    return canvas.crop(canvas.getbbox())


def luminance(colour: np.ndarray) -> float:
    return float(colour @ np.array([0.299, 0.587, 0.114], dtype=np.float32))


def digit_colour(rng: np.random.Generator, background_lum: float) -> np.ndarray:
    """A random colour whose luminance differs from the background's by at least 0.3."""
    for _ in range(20):
        colour = random_colour(rng)
        if abs(luminance(colour) - background_lum) >= 0.3:
            return colour
    return np.full(3, 0.0 if background_lum > 0.5 else 1.0, dtype=np.float32)


def render_image(digit: int, rng: np.random.Generator, size: int, fonts: list[str]) -> Image.Image:
    """One `size` x `size` RGB image of `digit`."""
    font_path = fonts[rng.integers(len(fonts))]
    stroke = int(rng.choice([0, 0, 0, 2, 4, 7]))
    mask = glyph_mask(digit, font_path, stroke)
    mask = mask.rotate(rng.uniform(-25, 25), resample=Image.BICUBIC, expand=True)
    mask = mask.crop(mask.getbbox())

    # Height 40-85% of the image, width from the glyph's own aspect jittered by up to 25%, both kept inside.
    target_h = rng.uniform(0.40, 0.85) * size
    aspect = mask.width / mask.height * math.exp(rng.uniform(-0.25, 0.25))
    target_w = target_h * aspect
    shrink = min(1.0, 0.95 * size / target_w)
    height, width = max(4, round(target_h * shrink)), max(3, round(target_w * shrink))
    mask = mask.resize((width, height), Image.LANCZOS)
    top, left = int(rng.integers(0, size - height + 1)), int(rng.integers(0, size - width + 1))
    alpha = np.zeros((size, size, 1), dtype=np.float32)
    alpha[top : top + height, left : left + width, 0] = np.asarray(mask, dtype=np.float32) / 255.0

    background = make_background(rng, size)
    under = alpha[..., 0] > 0.5
    background_colour = background[under].mean(axis=0) if under.any() else background.mean(axis=(0, 1))
    colour = digit_colour(rng, luminance(background_colour))
    if rng.uniform() < 0.3:  # a shifted shadow in the opposite tone
        offset = max(1, round(size * rng.uniform(0.01, 0.04)))
        shadow = np.roll(alpha, (offset, offset), axis=(0, 1)) * rng.uniform(0.4, 0.9)
        shadow_colour = np.full(3, 1.0 if luminance(colour) < 0.5 else 0.0, dtype=np.float32)
        background = background * (1 - shadow) + shadow_colour * shadow
    foreground = np.broadcast_to(colour, (size, size, 3))
    if rng.uniform() < 0.3:  # a two-tone digit
        other = np.clip(colour + rng.uniform(-0.3, 0.3, size=3), 0, 1).astype(np.float32)
        foreground = blend(colour, other, np.linspace(0, 1, size, dtype=np.float32)[:, None, None])
    pixels = background * (1 - alpha) + foreground * alpha
    image = Image.fromarray(np.clip(pixels * 255 + 0.5, 0, 255).astype(np.uint8), "RGB")
    if rng.uniform() < 0.2:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0) * size / 64))
    return image


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_SEED_OFFSET[split], index])


def write_chunk(task: tuple[str, str, int, int, int, int]) -> int:
    """Render and save images `start` to `stop` of one split; returns how many were written."""
    output_dir, split, start, stop, seed, size = task
    fonts = font_files()
    for index in range(start, stop):
        digit = index % len(CLASS_NAMES)
        image = render_image(digit, image_rng(seed, split, index), size, fonts)
        path = Path(output_dir) / split / str(digit) / f"{digit}_{index:06d}.png"
        image.save(path, compress_level=1)
    return stop - start


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="Folder to write (train/ and test/ inside).")
    parser.add_argument("--resolution", type=int, default=128, help="Image side in pixels (e.g. 64 or 128).")
    parser.add_argument("--train_per_class", type=int, default=4000)
    parser.add_argument("--test_per_class", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--overwrite", action="store_true", help="Write into an existing, non-empty folder.")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.resolution < 16:
        raise SystemExit("--resolution must be at least 16.")
    output_dir = Path(args.output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not args.overwrite:
        raise SystemExit(f"{output_dir} exists and is not empty; pass --overwrite to write into it.")
    counts = {"train": args.train_per_class * len(CLASS_NAMES), "test": args.test_per_class * len(CLASS_NAMES)}
    for split in SPLITS:
        for digit in range(len(CLASS_NAMES)):
            (output_dir / split / str(digit)).mkdir(parents=True, exist_ok=True)

    chunk = 256
    tasks = [
        (str(output_dir), split, start, min(start + chunk, counts[split]), args.seed, args.resolution)
        for split in SPLITS
        for start in range(0, counts[split], chunk)
    ]
    start_time = time.perf_counter()
    if args.num_workers <= 1:
        written = sum(map(write_chunk, tasks))
    else:
        with ProcessPoolExecutor(args.num_workers) as pool:
            written = sum(pool.map(write_chunk, tasks))
    elapsed = time.perf_counter() - start_time

    config = {
        "resolution": args.resolution,
        "seed": args.seed,
        "train_per_class": args.train_per_class,
        "test_per_class": args.test_per_class,
        "classes": {str(i): name for i, name in enumerate(CLASS_NAMES)},
        "fonts": [Path(path).name or "Pillow default" for path in font_files()],
    }
    (output_dir / "digits_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"Wrote {written} images ({counts['train']} train, {counts['test']} test) of {args.resolution}px to "
          f"{output_dir.resolve()} in {elapsed:.1f} s ({written / max(elapsed, 1e-9) * 60:.0f} images/min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
