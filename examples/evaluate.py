"""Score a class-conditional FlexVARPipeline with the digits classifier: class accuracy and Frechet distance.

    python examples/evaluate.py --model models/flexvar-digits --classifier models/digits-classifier \
        --data_dir data/digits128 --num_per_class 100 --output results/digits-eval.md

For every setting (size, number of steps, guidance, in-painting) it generates `--num_per_class` images of each class,
classifies them with the classifier of `examples/train_classifier.py` and reports

- accuracy: the fraction classified as the class they were generated for, overall and per class (the JSON has
  every class, the table the two weakest);
- FD: the Frechet distance between the classifier's pooled features of the generated images and of the held-out
  real images (`DATA_DIR/test`), i.e. FID with the digits classifier in place of Inception. Every image is resized
  to the classifier's 64x64 input first, so for other aspect ratios the distance also measures the change of shape.

Sampling and the Frechet distance are `flexvar_hf.evaluation`'s, as in `evaluate_imagenet.py`: sample `i` of a
setting has class `i % 10` and its own generator seeded from (seed + setting index, i), so a row's images do not
depend on `--batch_size`; images are rounded to uint8 before they are classified, as saved images would be.

Reference rows: the held-out real images themselves (accuracy of the classifier; FD between two halves of the real
set, the noise floor of the FD at that sample size) and their VQ reconstructions (the tokenizer's ceiling).
In-painting rows regenerate the right half of held-out real images with `FlexVARInpaintPipeline` and their own
class. The table goes to `--output` (markdown) and the numbers to the same name with `.json`.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flexvar_hf import FlexVARPipeline  # noqa: E402
from flexvar_hf.evaluation import SamplePlan, generate_samples  # noqa: E402
from flexvar_hf.evaluation import frechet_distance_of_features as frechet_distance  # noqa: E402
from flexvar_hf.utils.io import atomic_files  # noqa: E402
from generate import parse_size  # noqa: E402
from train_classifier import classify, classify_pixels, list_imagefolder, load_classifier, load_split  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO_ROOT / "models" / "flexvar-digits"
DEFAULT_CLASSIFIER = REPO_ROOT / "models" / "digits-classifier"
# The pipeline's own defaults (guidance_scale, top_k, ...), named in the report for arguments left out.
PIPELINE_DEFAULTS = {name: p.default for name, p in inspect.signature(FlexVARPipeline.__call__).parameters.items()}


@dataclass
class Setting:
    name: str
    height: int
    width: int
    steps: int | None = None
    guidance_scale: float | None = None
    kind: str = "generate"  # "generate", "inpaint", "real", "reconstruction"


@dataclass
class Result:
    setting: str
    size: str
    steps: str
    guidance: str
    accuracy: float
    fd: float
    images: int
    seconds_per_image: float
    per_class_accuracy: list[float]  # by class index


def per_class_accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float]:
    """Fraction of the images of each class that the classifier gives that class (NaN for a class with none)."""
    correct = torch.zeros(num_classes).index_add_(0, labels, (predictions == labels).float())
    counts = torch.bincount(labels, minlength=num_classes).float()
    return (correct / counts).tolist()


def weakest_classes(result: Result, count: int = 2) -> str:
    """The `count` classes with the lowest accuracy, e.g. "7: 80.0%, 1: 90.5%"."""
    order = sorted(range(len(result.per_class_accuracy)), key=lambda c: result.per_class_accuracy[c])[:count]
    return ", ".join(f"{c}: {100 * result.per_class_accuracy[c]:.1f}%" for c in order)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="FlexVARPipeline folder or hub id.")
    parser.add_argument("--classifier", default=str(DEFAULT_CLASSIFIER), help="Folder from train_classifier.py.")
    parser.add_argument("--data_dir", required=True, help="The digits imagefolder (its test/ split is used).")
    parser.add_argument("--resolution", type=int, default=128, help="The size the model was trained at.")
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 6, 8, 10], help="Step counts at --resolution.")
    parser.add_argument("--zero_shot_sizes", type=parse_size, nargs="*", default=[(64, 64), (128, 256), (256, 256)],
                        help="Sizes the model was not trained at, evaluated with their default step count.")
    parser.add_argument("--no_guidance_row", action="store_true", help="Skip the row without guidance.")
    parser.add_argument("--no_inpainting", action="store_true", help="Skip the in-painting row.")
    parser.add_argument("--num_per_class", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=250, help="Images generated per pipeline call.")
    parser.add_argument("--guidance_scale", type=float, default=None, help="Default: the pipeline's (3.5).")
    parser.add_argument("--guidance_schedule", default=None, choices=["linear", "constant"],
                        help="Default: the model's own (its scheduler config).")
    parser.add_argument("--top_k", type=int, default=None, help="Default: the pipeline's (900).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--output", default="outputs/digits-eval.md", help="Markdown table; numbers in .json.")
    parser.add_argument("--samples", default=None, help="Also write a PNG of the first images of every setting.")
    args = parser.parse_args(argv)
    outputs = output_paths(args)
    if len({path.resolve() for path in outputs}) < len(outputs):
        parser.error(f"--output {args.output}, its numbers' {outputs[1]} and --samples must be different files; "
                     "give --output a .md name.")
    return args


def build_settings(args) -> list[Setting]:
    side = args.resolution
    settings = [Setting("real held-out images", side, side, kind="real"),
                Setting("VQ reconstruction", side, side, kind="reconstruction")]
    default_steps = args.steps[-1] if args.steps else None
    for steps in args.steps:
        settings.append(Setting("generate", side, side, steps, args.guidance_scale))
    if not args.no_guidance_row:
        settings.append(Setting("generate, no guidance", side, side, default_steps, 1.0))
    if not args.no_inpainting:
        settings.append(Setting("in-paint right half", side, side, default_steps, args.guidance_scale, "inpaint"))
    for height, width in args.zero_shot_sizes:
        settings.append(Setting("zero-shot size", height, width, None, args.guidance_scale))
    return settings


def pil_from_uint8(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(array) for array in images.permute(0, 2, 3, 1).numpy()]


def run_setting(pipe, classifier, setting: Setting, args, real_images, real_labels, real_features, seed: int):
    """(Result, up to 10 sample images) of one setting; `seed` seeds its samples' generators."""
    num_classes = pipe.transformer.config.num_classes
    plan = SamplePlan.per_class(range(num_classes), args.num_per_class, seed)
    extra = {name: value for name, value in [("guidance_scale", setting.guidance_scale),
                                             ("guidance_schedule", args.guidance_schedule), ("top_k", args.top_k)]
             if value is not None}
    start = time.perf_counter()
    if setting.kind == "real":
        # Half of the real images against the other half: the noise floor of the FD.
        predictions, features = classify_pixels(classifier, real_images.float() / 127.5 - 1)
        half = len(features) // 2
        order = torch.randperm(len(features), generator=torch.Generator().manual_seed(args.seed))
        accuracy = (predictions == real_labels).float().mean().item()
        fd = frechet_distance(features[order[:half]], features[order[half:]])
        samples = pil_from_uint8(real_images[:: max(1, len(real_images) // 10)][:10])
        return Result(setting.name, f"{setting.height}x{setting.width}", "-", "-", accuracy, fd, len(features),
                      0.0, per_class_accuracy(predictions, real_labels, num_classes)), samples

    outputs, used_labels = [], []
    if setting.kind in ("reconstruction", "inpaint"):
        from flexvar_hf.pipelines import FlexVARInpaintPipeline

        index = torch.cat([(real_labels == c).nonzero().flatten()[: args.num_per_class] for c in range(num_classes)])
        sources = real_images[index]
        used_labels = real_labels[index]
        for begin in range(0, len(sources), args.batch_size):
            batch = sources[begin : begin + args.batch_size]
            pixels = batch.float().to(pipe.device) / 127.5 - 1
            if setting.kind == "reconstruction":
                with torch.no_grad():
                    decoded = pipe.vqvae(pixels.to(pipe.vqvae.dtype)).sample.float()
                outputs.append(((decoded.clamp(-1, 1) + 1) / 2).cpu())
            else:
                inpaint = FlexVARInpaintPipeline(**pipe.components)
                inpaint.set_progress_bar_config(disable=True)
                mask = torch.zeros(1, 1, setting.height, setting.width)
                mask[..., setting.width // 2 :] = 1
                result = inpaint(
                    image=(batch.float() / 255), mask_image=mask, class_labels=used_labels[begin : begin +
                                                                                           len(batch)].tolist(),
                    height=setting.height, width=setting.width, num_inference_steps=setting.steps,
                    generator=plan.generators(range(begin, begin + len(batch)), pipe.device), output_type="pt",
                    **extra,
                ).images
                outputs.append(result.float().cpu())
    else:
        batches = generate_samples(pipe, plan, range(plan.num_samples), args.batch_size, height=setting.height,
                                   width=setting.width, num_inference_steps=setting.steps, **extra)
        samples = np.concatenate([images for _, images in batches])
        outputs.append(torch.from_numpy(samples).permute(0, 3, 1, 2).float() / 255)
        used_labels = torch.tensor(plan.labels(range(plan.num_samples)))
    elapsed = time.perf_counter() - start
    images = torch.cat(outputs)
    predictions, features = classify(classifier, images)
    accuracy = (predictions == used_labels).float().mean().item()
    fd = frechet_distance(features, real_features)
    step_text = str(len(pipe.scheduler.scales)) if setting.kind in ("generate", "inpaint") else "-"
    guidance_scale = PIPELINE_DEFAULTS["guidance_scale"] if setting.guidance_scale is None else setting.guidance_scale
    guidance = "-" if setting.kind == "reconstruction" else f"{guidance_scale:g}"
    if setting.kind != "reconstruction" and guidance_scale != 1.0:
        guidance += f" ({args.guidance_schedule or pipe.scheduler.config.guidance_schedule})"
    per_class = [images[int((used_labels == label).nonzero()[0])] for label in range(min(10, num_classes))]
    samples = [Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for image in per_class]
    return Result(setting.name, f"{setting.height}x{setting.width}", step_text, guidance, accuracy, fd, len(images),
                  elapsed / len(images), per_class_accuracy(predictions, used_labels, num_classes)), samples


def markdown_table(results: list[Result], args, device_name: str) -> str:
    top_k = PIPELINE_DEFAULTS["top_k"] if args.top_k is None else args.top_k
    lines = [
        f"Model `{args.model}`, classifier `{args.classifier}`, {args.num_per_class} images per class, seed "
        f"{args.seed}, {device_name}, {args.dtype}, top-k {top_k}. FD: Frechet distance of the "
        "classifier's features against the held-out real images (lower is better).",
        "",
        "| setting | size | steps | guidance | class accuracy | weakest classes | FD | images | s / image |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(f"| {r.setting} | {r.size} | {r.steps} | {r.guidance} | {100 * r.accuracy:.1f}% | "
                     f"{weakest_classes(r)} | {r.fd:.2f} | {r.images} | {r.seconds_per_image:.3f} |")
    return "\n".join(lines) + "\n"


def sample_sheet(rows: list[list[Image.Image]], cell: int = 96, pad: int = 2) -> Image.Image:
    width = max(len(row) for row in rows) * (cell + pad) + pad
    sheet = Image.new("RGB", (width, len(rows) * (cell + pad) + pad), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            image = image.copy()
            image.thumbnail((cell, cell))
            sheet.paste(image, (pad + c * (cell + pad), pad + r * (cell + pad)))
    return sheet


def main(argv=None) -> int:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    pipe = FlexVARPipeline.from_pretrained(args.model, dtype=dtype).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    classifier = load_classifier(args.classifier, args.device)
    real_images, real_labels = load_split(args.data_dir, "test")
    _, _, classes = list_imagefolder(args.data_dir, "test")
    if len(classes) != pipe.transformer.config.num_classes:
        raise SystemExit(f"The data has {len(classes)} classes, the model {pipe.transformer.config.num_classes}.")
    # Full-resolution copies for reconstruction and in-painting.
    full_images, full_labels = load_split(args.data_dir, "test", size=args.resolution, resample=Image.BICUBIC)
    _, real_features = classify_pixels(classifier, real_images.float() / 127.5 - 1)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"

    results, sample_rows = [], []
    for index, setting in enumerate(build_settings(args)):
        if setting.kind == "real":
            result, samples = run_setting(pipe, classifier, setting, args, real_images, real_labels, real_features,
                                          args.seed + index)
        else:
            result, samples = run_setting(pipe, classifier, setting, args, full_images, full_labels, real_features,
                                          args.seed + index)
        results.append(result)
        sample_rows.append(samples)
        print(f"{result.setting:28s} {result.size:>8s} steps {result.steps:>3s} guidance {result.guidance:>4s}: "
              f"accuracy {100 * result.accuracy:5.1f}%  FD {result.fd:8.2f}  ({result.images} images, "
              f"{result.seconds_per_image:.3f} s/image)", flush=True)
        write_outputs(args, results, sample_rows, device_name)  # after every row, so a cut-off run keeps them

    output = Path(args.output)
    print(f"Wrote {output.resolve()}")
    return 0


def output_paths(args) -> list[Path]:
    """The markdown table, its numbers (`.json` beside it) and, with `--samples`, the sample sheet."""
    output = Path(args.output)
    return [output, output.with_suffix(".json")] + ([Path(args.samples)] if args.samples else [])


def write_outputs(args, results: list[Result], sample_rows, device_name: str) -> None:
    """Write the table, its `.json` beside it and the optional sample sheet, each under a temporary name renamed
    into place (the row loop rewrites them after every row, so a cut-off run keeps complete files)."""
    with atomic_files(*output_paths(args), overwrite=True) as staging:
        staging[0].write_text(markdown_table(results, args, device_name))
        staging[1].write_text(json.dumps(
            {"model": args.model, "num_per_class": args.num_per_class, "seed": args.seed, "device": device_name,
             "dtype": args.dtype, "results": [asdict(r) for r in results]}, indent=2) + "\n")
        if args.samples:
            sample_sheet(sample_rows).save(staging[2], format="PNG")


if __name__ == "__main__":
    sys.exit(main())
