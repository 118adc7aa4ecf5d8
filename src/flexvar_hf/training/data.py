"""Image datasets for training: loading (hub or imagefolder), checks, transforms without torchvision, loaders.

Used by `examples/train.py` (class-conditional FlexVAR) and `examples/train_vq.py` (the tokenizer, no labels).
Every random choice of the data pipeline is a function of `(seed, epoch, sample index)`: the shuffling order of an
epoch comes from `(seed, epoch)` and each sample's crop and flip from `(seed, epoch, index)`. So the batches do not
depend on worker count, on the RNG state of the process, or on whether the run was resumed half-way through an epoch
(`accelerator.skip_first_batches` skips whole batches without changing the ones that follow).

Typical use:

```python
parser = argparse.ArgumentParser()
add_data_args(parser)                           # --dataset_name ... --resolution --center_crop --random_flip ...
args = parser.parse_args()
check_data_args(args)                           # cheap checks before any loading; ValueError on bad input
dataset = load_image_dataset(args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir,
                             image_column=args.image_column, label_column=args.label_column,
                             max_train_samples=args.max_train_samples, seed=args.seed,
                             image_check=args.image_check)   # every image decoded once, before training
info = label_info(dataset, args.label_column)   # num_classes, id2label from a ClassLabel column
check_labels(info, num_classes)                 # labels must lie in [0, num_classes)
transform = ImageTransform(parse_resolution(args.resolution), crop=crop_mode(args), random_flip=args.random_flip)
train_dataset = ImageDataset(dataset, transform, args.image_column, args.label_column, seed=args.seed)
loader = build_dataloader(train_dataset, args.train_batch_size, seed=args.seed,
                          num_workers=args.dataloader_num_workers)
sampler = loader.sampler                        # an EpochShuffleSampler; take it before accelerator.prepare
loader = accelerator.prepare(loader)            # optional
for epoch in range(first_epoch, num_epochs):
    epoch_loader = accelerator.skip_first_batches(loader, skip) if epoch == first_epoch and skip else loader
    set_dataloader_epoch(epoch_loader, epoch)   # or sampler.set_epoch(epoch)
    for batch in epoch_loader:                  # {"pixel_values": (B, 3, H, W) in [-1, 1], "labels": (B,)}
        ...
```

Bad data stops a run before training starts: `load_image_dataset` refuses a missing split or column, an image folder
without class sub-folders (or with only one) when labels are asked for, and by default (`--image_check stop`) decodes
every image once (`find_unreadable_images`: PIL, JPEGs at 1/8 scale, converted to RGB) and refuses the dataset if
any cannot be read, listing them. `--image_check skip` leaves such images out instead (and logs them);
`--image_check off` skips the scan for very large datasets that are known to be clean: an unreadable image then stops
training when it is drawn, with an error naming it. The scan runs with `datasets.map`, so its result is cached with
the dataset's other processing (a resumed run does not scan again) and it runs in `--dataloader_num_workers`
processes.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..utils.validation import check_choice

logger = logging.getLogger(__name__)

CROP_MODES = ("center", "random")
IMAGE_CHECKS = ("stop", "skip", "off")

__all__ = [
    "CROP_MODES",
    "IMAGE_CHECKS",
    "LabelInfo",
    "ImageTransform",
    "ImageDataset",
    "EpochShuffleSampler",
    "add_data_args",
    "build_dataloader",
    "check_class_folders",
    "check_data_args",
    "check_dataset_columns",
    "check_labels",
    "collate_examples",
    "crop_mode",
    "find_unreadable_images",
    "image_problem",
    "label_info",
    "load_image_dataset",
    "open_image",
    "parse_resolution",
    "sample_seed",
    "set_dataloader_epoch",
]


# ----------------------------------------------------------------------------------------------------------------
# Arguments


def parse_resolution(value: int | str | Sequence[int], multiple_of: int = 16) -> tuple[int, int]:
    """`256`, `"256"`, `"256x512"` (height x width) or `(256, 512)` -> `(height, width)`, each a positive multiple of
    `multiple_of` (the tokenizer's pixels per token)."""
    if isinstance(value, str):
        parts = value.lower().replace("*", "x").split("x")
        try:
            sides = [int(part) for part in parts]
        except ValueError:
            sides = []
    elif isinstance(value, int) and not isinstance(value, bool):
        sides = [value]
    elif isinstance(value, Sequence):
        sides = list(value)
    else:
        sides = []
    if len(sides) == 1:
        sides = sides * 2
    if len(sides) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sides):
        raise ValueError(f"`resolution` must be a side like 256 or HEIGHTxWIDTH like 256x512, got {value!r}.")
    if any(side % multiple_of for side in sides):
        raise ValueError(
            f"`resolution` sides must be multiples of {multiple_of} (pixels per token of the tokenizer), "
            f"got {sides[0]}x{sides[1]}."
        )
    return sides[0], sides[1]


def add_data_args(parser: argparse.ArgumentParser, labels: bool = True, default_resolution: str = "256") -> None:
    """Add the data arguments of the training scripts to `parser` (an argument group "data").

    `--dataset_name`, `--dataset_config_name`, `--train_data_dir`, `--cache_dir`, `--image_column`, `--resolution`,
    `--center_crop`, `--random_crop`, `--random_crop_min_fraction`, `--random_flip`, `--max_train_samples`,
    `--dataloader_num_workers`, and with `labels` also `--label_column`.
    """
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="A dataset on the Hugging Face Hub (or a local dataset script/folder for `datasets.load_dataset`).",
    )
    group.add_argument("--dataset_config_name", type=str, default=None, help="The dataset's configuration name.")
    group.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="An image folder with one sub-folder per class (loaded with `datasets`' imagefolder builder; the "
        "sub-folder names become the labels, sorted alphabetically).",
    )
    group.add_argument("--cache_dir", type=str, default=None, help="Where downloaded datasets and models are cached.")
    group.add_argument("--image_column", type=str, default="image", help="The column holding the images.")
    if labels:
        group.add_argument("--label_column", type=str, default="label", help="The column holding the class ids.")
    group.add_argument(
        "--resolution",
        type=str,
        default=default_resolution,
        help="Training size in pixels: one side (256) or HEIGHTxWIDTH (256x384); multiples of 16. Images are "
        "resized to cover it, then cropped.",
    )
    crop = group.add_mutually_exclusive_group()
    crop.add_argument("--center_crop", action="store_true", help="Crop the centre (the default).")
    crop.add_argument("--random_crop", action="store_true", help="Crop at a random position.")
    group.add_argument(
        "--random_crop_min_fraction",
        type=float,
        default=1.0,
        help="With --random_crop, first resize to a random size between covering the crop and covering it divided "
        "by this fraction, so the crop keeps between this fraction and all of the short side. 0.88 is FlexVAR's "
        "ImageNet augmentation; 1.0 (default) only moves the crop.",
    )
    group.add_argument("--random_flip", action="store_true", help="Flip images horizontally with probability 0.5.")
    group.add_argument(
        "--max_train_samples",
        type=int,
        default=None,
        help="Train on a random subset of this many examples (chosen with --seed), for debugging or quick runs.",
    )
    group.add_argument(
        "--dataloader_num_workers", type=int, default=0, help="Data loading worker processes (0: the main process)."
    )
    group.add_argument(
        "--image_check",
        choices=IMAGE_CHECKS,
        default="stop",
        help="Before training, decode every image once: 'stop' (default) refuses a dataset with unreadable images and "
        "lists them, 'skip' leaves them out and logs them, 'off' skips the scan (an unreadable image then stops "
        "training when it is drawn). The scan is cached with the dataset.",
    )


def crop_mode(args: argparse.Namespace) -> str:
    """"random" with `--random_crop`, else "center"."""
    if getattr(args, "random_crop", False) and getattr(args, "center_crop", False):
        raise ValueError("Pass at most one of --center_crop and --random_crop.")
    return "random" if getattr(args, "random_crop", False) else "center"


def check_data_args(args: argparse.Namespace, multiple_of: int = 16) -> tuple[int, int]:
    """Checks of the data arguments that need no loading; returns the resolution `(height, width)`.

    Raises ValueError for: neither or both of `--dataset_name` and `--train_data_dir`, a `--train_data_dir` that is
    not an existing folder, a bad `--resolution`, both crop flags, a `--random_crop_min_fraction` outside (0, 1], a
    `--max_train_samples` below 1 or negative `--dataloader_num_workers`.
    """
    dataset_name, train_data_dir = getattr(args, "dataset_name", None), getattr(args, "train_data_dir", None)
    if (dataset_name is None) == (train_data_dir is None):
        raise ValueError("Pass exactly one of --dataset_name (a hub dataset) and --train_data_dir (an image folder).")
    if train_data_dir is not None and not Path(train_data_dir).is_dir():
        raise ValueError(f"--train_data_dir {train_data_dir!r} is not an existing folder.")
    resolution = parse_resolution(args.resolution, multiple_of)
    crop_mode(args)
    fraction = getattr(args, "random_crop_min_fraction", 1.0)
    if not 0 < fraction <= 1:
        raise ValueError(f"--random_crop_min_fraction must be in (0, 1], got {fraction}.")
    if getattr(args, "max_train_samples", None) is not None and args.max_train_samples < 1:
        raise ValueError(f"--max_train_samples must be positive, got {args.max_train_samples}.")
    if getattr(args, "dataloader_num_workers", 0) < 0:
        raise ValueError(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}.")
    return resolution


# ----------------------------------------------------------------------------------------------------------------
# Loading and checking


def check_dataset_columns(dataset, image_column: str, label_column: str | None = None) -> None:
    """ValueError naming the available columns when `image_column` (or `label_column`) is not in `dataset`."""
    columns = list(dataset.column_names)
    for flag, column in (("--image_column", image_column), ("--label_column", label_column)):
        if column is not None and column not in columns:
            raise ValueError(f"{flag} {column!r} is not a column of the dataset; its columns are {columns}.")


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | os.PathLike | None = None,
    cache_dir: str | None = None,
    split: str = "train",
    image_column: str = "image",
    label_column: str | None = None,
    max_train_samples: int | None = None,
    seed: int | None = None,
    image_check: str = "stop",
    num_proc: int | None = None,
):
    """Load the training split as a `datasets.Dataset` with only the image (and label) columns.

    Exactly one of `dataset_name` (`datasets.load_dataset(dataset_name, dataset_config_name)`) and `train_data_dir`
    (`datasets.load_dataset("imagefolder", data_dir=train_data_dir)`: images in one sub-folder per class give a
    `ClassLabel` column "label"). A label column of strings is turned into class ids (`class_encode_column`, names
    sorted). With `max_train_samples`, a random subset of that size (shuffled with `seed`). Then, unless
    `image_check="off"`, every image is decoded once (`find_unreadable_images`, in `num_proc` processes): with
    "stop" unreadable images are a ValueError listing them, with "skip" they are left out and logged.

    Raises:
        ValueError: Neither or both sources, a folder that does not exist or holds no images, a missing split or
            column, an image folder with fewer than two class sub-folders when a label column is asked for,
            unreadable images (with `image_check="stop"`).
    """
    import datasets

    check_choice("image_check", image_check, IMAGE_CHECKS)  # before the (possibly long) loading
    if (dataset_name is None) == (train_data_dir is None):
        raise ValueError("Pass exactly one of `dataset_name` (a hub dataset) and `train_data_dir` (an image folder).")
    if train_data_dir is not None:
        if not Path(train_data_dir).is_dir():
            raise ValueError(f"Image folder {str(train_data_dir)!r} does not exist.")
        try:
            loaded = datasets.load_dataset("imagefolder", data_dir=str(train_data_dir), cache_dir=cache_dir)
        except (FileNotFoundError, datasets.exceptions.DataFilesNotFoundError) as error:
            raise ValueError(f"Image folder {str(train_data_dir)!r} holds no images: {error}") from error
    else:
        loaded = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"The dataset has no {split!r} split; its splits are {list(loaded)}.")
        dataset = loaded[split]
    else:
        dataset = loaded
    if train_data_dir is not None and label_column is not None and label_column not in dataset.column_names:
        check_class_folders(train_data_dir)
    check_dataset_columns(dataset, image_column, label_column)
    if label_column == image_column:
        raise ValueError(f"--image_column and --label_column are the same column {image_column!r}.")
    dataset = dataset.select_columns([image_column] + ([label_column] if label_column else []))
    if label_column is not None:
        feature = dataset.features[label_column]
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
            dataset = dataset.class_encode_column(label_column)
    if max_train_samples is not None:
        dataset = dataset.shuffle(seed=seed).select(range(min(max_train_samples, len(dataset))))
    if image_check != "off" and len(dataset):
        unreadable = find_unreadable_images(dataset, image_column, num_proc)
        if unreadable and image_check == "stop":
            raise ValueError(
                f"{len(unreadable)} of the {len(dataset)} images cannot be read: {_list_unreadable(unreadable)}. "
                "Fix or remove them, or pass --image_check skip to train without them."
            )
        if unreadable:
            logger.warning(f"Leaving out {len(unreadable)} unreadable images: {_list_unreadable(unreadable)}")
            dataset = dataset.select(sorted(set(range(len(dataset))) - {index for index, _, _ in unreadable}))
    if len(dataset) == 0:
        raise ValueError("The training dataset is empty.")
    return dataset


def check_class_folders(train_data_dir: str | os.PathLike) -> None:
    """ValueError saying what is wrong with an image folder for which `imagefolder` made no label column: it has no
    class sub-folders, or only one (the builder drops the labels of a single class)."""
    classes = sorted(entry.name for entry in Path(train_data_dir).iterdir() if entry.is_dir())
    if len(classes) < 2:
        found = f"only one class sub-folder ({classes[0]!r})" if classes else "no class sub-folders"
        raise ValueError(
            f"--train_data_dir {str(train_data_dir)!r} has {found}: class-conditional training reads the classes "
            "from the sub-folder names and needs images in at least two of them (one sub-folder per class)."
        )


def open_image(value) -> Image.Image:
    """A datasets image value (a PIL image, a file path, or a `{"bytes", "path"}` dict of an undecoded `Image`
    feature) as a PIL image, opened lazily; ValueError for anything else."""
    if isinstance(value, (str, os.PathLike)):
        return Image.open(value)
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        return Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
    if not isinstance(value, Image.Image):
        raise ValueError(f"Expected images (a datasets Image feature or file paths), got {type(value).__name__}.")
    return value


def image_problem(value) -> str | None:
    """Why the image `value` (as `open_image` takes it) cannot be decoded to RGB, or None. JPEGs decode at 1/8 scale
    (`Image.draft`), which reads every byte of the file at a fraction of the cost."""
    try:
        image = open_image(value)
        image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
        image.convert("RGB")
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        return f"{type(error).__name__}: {error}"
    return None


def find_unreadable_images(dataset, image_column: str, num_proc: int | None = None) -> list[tuple[int, str, str]]:
    """`(index, file, problem)` of every image of `dataset[image_column]` that cannot be decoded (`image_problem`).

    Images are read undecoded (their bytes or paths) and checked with `datasets.map`, which caches the result with
    the dataset's fingerprint and runs in `num_proc` processes."""
    import datasets

    if isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    problems = dataset.map(
        lambda batch: {"image_problem": [image_problem(value) for value in batch[image_column]]},
        batched=True,
        num_proc=num_proc,
        remove_columns=dataset.column_names,
        desc="Checking images",
    )["image_problem"]
    unreadable = []
    for index, problem in enumerate(problems):
        if problem is not None:
            value = dataset[index][image_column]
            name = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
            unreadable.append((index, str(name or f"example {index}"), problem))
    return unreadable


def _list_unreadable(unreadable: list[tuple[int, str, str]], limit: int = 10) -> str:
    shown = "; ".join(f"{name} ({problem})" for _, name, problem in unreadable[:limit])
    return shown + (f"; ... ({len(unreadable) - limit} more)" if len(unreadable) > limit else "")


@dataclass
class LabelInfo:
    """What the label column holds.

    Attributes:
        num_classes: Number of classes the data implies: the `ClassLabel` size, else the largest label + 1.
        id2label: Class id -> name from a `ClassLabel` column, else None.
        labels: The distinct label values present, sorted.
    """

    num_classes: int
    id2label: dict[int, str] | None
    labels: list[int]


def label_info(dataset, label_column: str) -> LabelInfo:
    """Read the classes of `label_column` (a `ClassLabel` or integer column); ValueError for other types."""
    import datasets

    if label_column not in dataset.column_names:
        raise ValueError(
            f"--label_column {label_column!r} is not a column of the dataset; its columns are {dataset.column_names}."
        )
    feature = dataset.features[label_column]
    if not (
        isinstance(feature, datasets.ClassLabel)
        or (isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")))
    ):
        raise ValueError(
            f"--label_column {label_column!r} must hold integer class ids (or a ClassLabel), got feature {feature}."
        )
    values = dataset.unique(label_column)
    if any(value is None for value in values):
        raise ValueError(f"--label_column {label_column!r} has missing labels.")
    values = sorted(int(value) for value in values)
    if isinstance(feature, datasets.ClassLabel):
        return LabelInfo(feature.num_classes, dict(enumerate(feature.names)), values)
    return LabelInfo(max(values) + 1 if values else 0, None, values)


def check_labels(info: LabelInfo, num_classes: int) -> None:
    """ValueError when a label of the data lies outside the model's classes `[0, num_classes)`."""
    bad = [label for label in info.labels if not 0 <= label < num_classes]
    if bad:
        shown = bad[:10] + (["..."] if len(bad) > 10 else [])
        raise ValueError(
            f"The data has labels outside the model's {num_classes} classes [0, {num_classes}): {shown}. "
            "Train a model with more classes (--num_classes) or remap the labels."
        )


# ----------------------------------------------------------------------------------------------------------------
# Transforms


def split_sample_key(key: int | tuple[int, int]) -> tuple[int, int]:
    """A dataset key -> (index, epoch): `EpochShuffleSampler` yields (index, epoch), a plain index is epoch 0."""
    index, epoch = key if isinstance(key, (tuple, list)) else (key, 0)
    return int(index), epoch


def sample_seed(seed: int | None, epoch: int, index: int) -> int:
    """A 63-bit seed for the random choices of sample `index` in `epoch`."""
    entropy = [int(seed or 0) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, int(index) & 0xFFFFFFFFFFFF]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) & (2**63 - 1)


class ImageTransform:
    """PIL image -> float tensor (3, height, width) in [-1, 1], without torchvision.

    The image (converted to RGB) is resized, bicubic with box pre-reduction for large downscales, to the smallest
    size that covers `resolution` (with `crop="random"` and `min_crop_fraction < 1`, to a random size up to
    `1 / min_crop_fraction` times that), then cropped to `resolution` at the centre or a random position, then
    flipped horizontally with probability 0.5 if `random_flip`. Random choices use the `generator` passed in.

    Args:
        resolution (`int` or `(height, width)`): Output size in pixels.
        crop (`str`, defaults to "center"): "center" or "random".
        random_flip (`bool`, defaults to False): Random horizontal flips.
        min_crop_fraction (`float`, defaults to 1.0): See above; FlexVAR's ImageNet recipe is 0.88 with random crops.
    """

    def __init__(
        self,
        resolution: int | tuple[int, int],
        crop: str = "center",
        random_flip: bool = False,
        min_crop_fraction: float = 1.0,
    ):
        self.height, self.width = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        check_choice("crop", crop, CROP_MODES)
        if not 0 < min_crop_fraction <= 1:
            raise ValueError(f"`min_crop_fraction` must be in (0, 1], got {min_crop_fraction}.")
        self.crop = crop
        self.random_flip = random_flip
        self.min_crop_fraction = min_crop_fraction

    def __repr__(self) -> str:
        return (
            f"ImageTransform(resolution=({self.height}, {self.width}), crop={self.crop!r}, "
            f"random_flip={self.random_flip}, min_crop_fraction={self.min_crop_fraction})"
        )

    @staticmethod
    def _uniform(generator: torch.Generator | None) -> float:
        return torch.rand(1, generator=generator).item()

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        image = image.convert("RGB")
        width, height = image.size
        scale = max(self.height / height, self.width / width)
        if self.crop == "random" and self.min_crop_fraction < 1:
            scale *= 1 + (1 / self.min_crop_fraction - 1) * self._uniform(generator)
        new_size = (max(self.width, round(width * scale)), max(self.height, round(height * scale)))
        if new_size != image.size:
            image = image.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=2.0)
        spare_x, spare_y = new_size[0] - self.width, new_size[1] - self.height
        if self.crop == "random":
            left = int(torch.randint(spare_x + 1, (1,), generator=generator))
            top = int(torch.randint(spare_y + 1, (1,), generator=generator))
        else:
            left, top = spare_x // 2, spare_y // 2
        if spare_x or spare_y:
            image = image.crop((left, top, left + self.width, top + self.height))
        if self.random_flip and self._uniform(generator) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array.copy()).permute(2, 0, 1)


# ----------------------------------------------------------------------------------------------------------------
# Datasets and loaders


class ImageDataset(torch.utils.data.Dataset):
    """A `datasets.Dataset` of images (and labels) as a torch map-style dataset of transformed examples.

    Items are `{"pixel_values": (3, H, W) float tensor in [-1, 1]}` plus `"labels"` (int) with a `label_column`.
    A key is a sample index or, as `EpochShuffleSampler` yields them, an `(index, epoch)` pair: the random
    transform of the sample is seeded by `sample_seed(seed, epoch, index)`, so it is reproducible anywhere.
    """

    def __init__(
        self,
        dataset,
        transform: ImageTransform,
        image_column: str = "image",
        label_column: str | None = None,
        seed: int | None = 0,
    ):
        check_dataset_columns(dataset, image_column, label_column)
        self.dataset = dataset
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = split_sample_key(key)
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        try:  # a datasets Image feature decodes when the example is read
            example = self.dataset[index]
            item = {"pixel_values": self.transform(open_image(example[self.image_column]), generator)}
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
            raise ValueError(
                f"Image {index} of column {self.image_column!r} cannot be read ({type(error).__name__}: {error}); "
                "`load_image_dataset`'s image check (--image_check stop, the default) finds such images before "
                "training."
            ) from error
        if self.label_column is not None:
            item["labels"] = int(example[self.label_column])
        return item


class EpochShuffleSampler(torch.utils.data.Sampler):
    """Yields `(index, epoch)` keys of all `num_samples` samples, in an order drawn from `(seed, epoch)`.

    Every process of a distributed run draws the same order (accelerate then gives each process its share of
    every batch). Set the epoch before iterating an epoch, with `set_dataloader_epoch(loader, epoch)` or
    `sampler.set_epoch(epoch)`.
    """

    def __init__(self, num_samples: int, seed: int | None = 0, shuffle: bool = True):
        self.num_samples = int(num_samples)
        self.seed = int(seed or 0)
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Move to `epoch`; a lower epoch than the current one is ignored.

        Epochs only move forward because accelerate's loaders also call `set_epoch` with their own pass counter when
        iterated, and that counter starts at 0 again in a resumed run (and in every `skip_first_batches` loader).
        Assign `sampler.epoch` to go back on purpose.
        """
        self.epoch = max(self.epoch, int(epoch))

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, 2**40))
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = range(self.num_samples)
        for index in order:
            yield (index, self.epoch)


def set_dataloader_epoch(dataloader, epoch: int) -> None:
    """Make `dataloader` (plain, prepared by accelerate, or from `accelerator.skip_first_batches`) yield `epoch`.

    Accelerate's loaders reset their sampler's epoch to their own iteration counter when iterated, and a loader from
    `skip_first_batches` starts that counter at 0; this sets the counter (`dataloader.set_epoch`) and then every
    `EpochShuffleSampler` found under the loader's (batch) samplers. Call it before iterating each epoch.
    """
    if hasattr(dataloader, "set_epoch"):
        dataloader.set_epoch(epoch)
    pending, seen = [dataloader], set()
    while pending:
        obj = pending.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, EpochShuffleSampler):
            obj.epoch = int(epoch)
            continue
        for name in ("batch_sampler", "sampler", "base_dataloader", "dataloader"):
            pending.append(getattr(obj, name, None))


def collate_examples(examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack `pixel_values` (contiguous float32) and `labels` (int64) of a list of `ImageDataset` items."""
    batch = {"pixel_values": torch.stack([example["pixel_values"] for example in examples]).contiguous()}
    if "labels" in examples[0]:
        batch["labels"] = torch.tensor([example["labels"] for example in examples], dtype=torch.long)
    return batch


def build_dataloader(
    dataset: ImageDataset,
    batch_size: int,
    seed: int | None = 0,
    shuffle: bool = True,
    num_workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """A `DataLoader` over `dataset` with an `EpochShuffleSampler` (`loader.sampler`).

    Pass it to `accelerator.prepare`, which shards each batch over processes and keeps the same sampler object, and
    call `set_dataloader_epoch(loader, epoch)` before iterating each epoch.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be positive, got {batch_size}.")
    sampler = EpochShuffleSampler(len(dataset), seed=seed, shuffle=shuffle)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_examples,
        drop_last=drop_last,
        pin_memory=pin_memory,
    )
