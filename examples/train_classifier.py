"""Train the small CNN that scores generated digits (class accuracy and Frechet distance of its features).

    python examples/make_digits_dataset.py --output_dir data/digits128
    python examples/train_classifier.py --data_dir data/digits128 --output_dir models/digits-classifier

Pure torch. Images of any size and aspect ratio are resized to 64x64 (`prepare_images`); training adds random
stretches, shifts, zooms, blur and noise so that the classifier also reads decoded and zero-shot-sized samples. The
output folder holds `model.safetensors` (float32, about 1 MB), `config.json` and `metrics.json` (held-out accuracy).
`load_classifier(folder)` loads it back.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

INPUT_SIZE = 64
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class DigitClassifier(nn.Module):
    """Four conv stages (two 3x3 convs with BatchNorm and ReLU, then 2x2 max-pooling for the first three), global
    average pooling to a `feature_dim` feature vector, and a linear head."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (24, 48, 96, 160)):
        super().__init__()
        layers, channels = [], 3
        for stage, width in enumerate(widths):
            for _ in range(2):
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
                channels = width
            if stage < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(channels, num_classes)
        self.feature_dim = channels
        self.config = {"num_classes": num_classes, "widths": list(widths), "input_size": INPUT_SIZE}

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, 64, 64) images in [-1, 1] -> (B, feature_dim) pooled features (the Frechet-distance features)."""
        return self.features(pixels).mean(dim=(2, 3))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.embed(pixels)))


def prepare_images(images, size: int = INPUT_SIZE) -> torch.Tensor:
    """PIL images, (B, 3, H, W) tensors in [0, 1] or (B, H, W, 3) numpy arrays in [0, 1] -> (B, 3, size, size)
    float tensor in [-1, 1], area-resized (aspect ratio not kept)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
    if isinstance(images, torch.Tensor):
        pixels = images.float()
        if pixels.shape[-2:] != (size, size):
            pixels = F.interpolate(pixels, size=(size, size), mode="area")
        return pixels * 2 - 1
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.BOX)
        arrays.append(np.asarray(image))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


def load_classifier(folder: str | os.PathLike, device: str | torch.device = "cpu") -> DigitClassifier:
    """The classifier saved by this script, in eval mode."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    model = DigitClassifier(config["num_classes"], tuple(config["widths"]))
    model.load_state_dict(load_file(folder / "model.safetensors"))
    return model.to(device).eval()


@torch.no_grad()
def classify_pixels(model: DigitClassifier, pixels: torch.Tensor, batch_size: int = 256):
    """(predicted labels (N,), features (N, feature_dim)) of prepared (N, 3, 64, 64) images in [-1, 1]."""
    device = next(model.parameters()).device
    predictions, features = [], []
    for start in range(0, len(pixels), batch_size):
        embedding = model.embed(pixels[start : start + batch_size].to(device).float())
        predictions.append(model.head(embedding).argmax(dim=-1).cpu())
        features.append(embedding.float().cpu())
    return torch.cat(predictions), torch.cat(features)


def classify(model: DigitClassifier, images, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted labels (N,), features (N, feature_dim)) for images of any size: PIL images, (N, 3, H, W)
    tensors in [0, 1] or (N, H, W, 3) arrays in [0, 1] (see `prepare_images`)."""
    return classify_pixels(model, prepare_images(images), batch_size)


# ----------------------------------------------------------------------------------------------------------------
# Data


def list_imagefolder(root: str | os.PathLike, split: str) -> tuple[list[Path], list[int], list[str]]:
    """Files and labels of `root/split/<class>/*`; classes are the sorted folder names (as `datasets` does)."""
    folder = Path(root) / split
    classes = sorted(path.name for path in folder.iterdir() if path.is_dir())
    files, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                files.append(path)
                labels.append(label)
    if not files:
        raise SystemExit(f"No images under {folder}/<class>/.")
    return files, labels, classes


def load_split(
    root,
    split: str,
    limit: int | None = None,
    workers: int | None = None,
    size: int = INPUT_SIZE,
    resample: int = Image.BOX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images (N, 3, size, size), labels (N,)) of one split, resized with `resample` (default: the
    classifier's 64x64 input, box filter)."""
    files, labels, _ = list_imagefolder(root, split)
    if limit is not None and limit < len(files):
        keep = np.random.default_rng(0).permutation(len(files))[:limit]
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]

    def read(path: Path) -> np.ndarray:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB").resize((size, size), resample))

    with ThreadPoolExecutor(workers or min(32, os.cpu_count() or 1)) as pool:
        arrays = list(pool.map(read, files))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random stretch (aspect 0.6-1.6), zoom (0.8-1.15), shift (up to 10%), blur and noise on (B, 3, H, W) in
    [-1, 1]."""
    batch, device = pixels.shape[0], pixels.device

    def uniform(low, high):
        return torch.rand(batch, generator=generator).to(device) * (high - low) + low

    log_aspect = uniform(math.log(0.6), math.log(1.6))
    zoom = uniform(0.8, 1.15)
    scale_x, scale_y = zoom * torch.exp(log_aspect / 2), zoom * torch.exp(-log_aspect / 2)
    theta = torch.zeros(batch, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 1, 1] = 1 / scale_x, 1 / scale_y
    theta[:, 0, 2], theta[:, 1, 2] = uniform(-0.1, 0.1), uniform(-0.1, 0.1)
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    pixels = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    blurred = F.avg_pool2d(F.pad(pixels, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    amount = uniform(0, 1)[:, None, None, None] * (torch.rand(batch, 1, 1, 1, generator=generator) < 0.5).to(device)
    pixels = pixels + amount * (blurred - pixels)
    sigma = uniform(0, 0.08)[:, None, None, None]
    noise = torch.randn(pixels.shape, generator=generator).to(device)
    return (pixels + sigma * noise).clamp(-1, 1)


# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="An imagefolder with train/ and test/ (class folders).")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--max_train_images", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--overwrite", action="store_true")
    return parser.parse_args(argv)


@torch.no_grad()
def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    predictions, _ = classify_pixels(model, images.float() / 127.5 - 1)
    return (predictions == labels).float().mean().item()


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    output_dir = Path(args.output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not args.overwrite:
        raise SystemExit(f"{output_dir} exists; pass --overwrite to replace it.")
    start = time.perf_counter()
    train_images, train_labels = load_split(args.data_dir, "train", args.max_train_images)
    test_images, test_labels = load_split(args.data_dir, "test")
    _, _, classes = list_imagefolder(args.data_dir, "train")
    print(f"{len(train_images)} train and {len(test_images)} test images, {len(classes)} classes, loaded in "
          f"{time.perf_counter() - start:.1f} s")

    device = torch.device(args.device)
    model = DigitClassifier(len(classes)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(train_images) / args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.learning_rate, total_steps=args.epochs *
                                                    steps_per_epoch, pct_start=0.15)
    generator = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_images), generator=generator)
        total_loss, correct = 0.0, 0
        for step in range(steps_per_epoch):
            index = order[step * args.batch_size : (step + 1) * args.batch_size]
            pixels = train_images[index].to(device).float() / 127.5 - 1
            labels = train_labels[index].to(device)
            logits = model(augment(pixels, generator))
            loss = F.cross_entropy(logits, labels, label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(index)
            correct += (logits.argmax(-1) == labels).sum().item()
        test_accuracy = accuracy(model, test_images, test_labels)
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {total_loss / len(train_images):.4f}, train accuracy "
              f"{correct / len(train_images):.4f} (augmented), test accuracy {test_accuracy:.4f} "
              f"({time.perf_counter() - start:.0f} s)")

    model = model.cpu().eval()
    output_dir.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()},
              output_dir / "model.safetensors")
    (output_dir / "config.json").write_text(json.dumps({**model.config, "classes": classes}, indent=2) + "\n")
    metrics = {
        "test_accuracy": test_accuracy,
        "train_images": len(train_images),
        "test_images": len(test_images),
        "epochs": args.epochs,
        "seconds": round(time.perf_counter() - start, 1),
        "device": str(device),
    }
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"Saved {output_dir.resolve()} (test accuracy {test_accuracy:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
