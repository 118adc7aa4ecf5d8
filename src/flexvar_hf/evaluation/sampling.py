"""Reproducible sampling for evaluation: each sample's class and random draws depend only on (seed, sample index).

Sample `i` of a `SamplePlan` has class `classes[i % len(classes)]` (so every run of consecutive samples, e.g. each of
the Inception Score's splits of 5,000, holds the classes equally often) and draws all its sampling noise from its own
`torch.Generator` seeded from `(seed, i)` (the pipelines' per-image generator lists). Which process, which batch and
which neighbours in the batch a sample gets change none of its draws, so 1 or 8 GPUs, or a resumed run, give the same
samples. (The floating-point result of the networks can still depend on the batch size on GPUs, whose kernels differ
by shape: keep the batch size for bit-identical reruns.)

Samples are written in shards of consecutive indices (`SampleShards`), each atomically, so that a killed run resumes
from its finished shards; `write_samples_npz` joins them into the ADM suite's `samples.npz`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..scales import is_int
from ..utils.io import atomic_save
from .npz import write_npz


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample `index` of a run seeded with `seed`: 63 bits of numpy's `SeedSequence([seed,
    index])`, so that neighbouring indices and seeds get unrelated streams."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class SamplePlan:
    """
    Which class and which random draws each sample of an evaluation gets.

    Args:
        classes (`tuple[int, ...]`): Distinct class ids, used in turn: sample `i` has class `classes[i % len]`.
        num_samples (`int`): Number of samples, > 0 (50 per class for the ADM suite: 50,000 for ImageNet).
        seed (`int`, defaults to 0): Run seed, >= 0; sample `i` draws from a generator seeded `sample_seed(seed, i)`.
    """

    classes: tuple[int, ...]
    num_samples: int
    seed: int = 0

    def __post_init__(self):
        classes = tuple(self.classes)
        if not classes or not all(is_int(label) and label >= 0 for label in classes):
            raise ValueError(f"`classes` must be a non-empty list of class ids >= 0, got {list(self.classes)!r}.")
        if len(set(classes)) != len(classes):
            repeated = sorted({label for label in classes if classes.count(label) > 1})
            raise ValueError(f"`classes` must be distinct; repeated: {repeated}.")
        if not is_int(self.num_samples) or self.num_samples < 1:
            raise ValueError(f"The number of samples must be a positive int, got {self.num_samples!r}.")
        if not is_int(self.seed) or self.seed < 0:
            raise ValueError(f"`seed` must be an int >= 0, got {self.seed!r}.")
        object.__setattr__(self, "classes", tuple(int(label) for label in classes))

    @classmethod
    def per_class(cls, classes: Sequence[int], images_per_class: int, seed: int = 0) -> SamplePlan:
        """`images_per_class` samples of each of `classes`."""
        if not is_int(images_per_class) or images_per_class < 1:
            raise ValueError(f"The number of images per class must be a positive int, got {images_per_class!r}.")
        return cls(tuple(classes), len(classes) * images_per_class, seed)

    def check_classes(self, num_classes: int) -> None:
        """ValueError unless every class is one of a model's `num_classes`."""
        outside = [label for label in self.classes if label >= num_classes]
        if outside:
            raise ValueError(f"Classes {outside[:10]} are outside the model's classes [0, {num_classes}).")

    def labels(self, indices: range) -> list[int]:
        """Class ids of the samples `indices`."""
        return [self.classes[index % len(self.classes)] for index in indices]

    def generators(self, indices: range, device: torch.device | str = "cpu") -> list[torch.Generator]:
        """One generator on `device` for each of the samples `indices`, seeded `sample_seed(seed, index)`."""
        return [torch.Generator(device).manual_seed(sample_seed(self.seed, index)) for index in indices]


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """`(B, 3, H, W)` floats in [0, 1] -> uint8 `(B, H, W, 3)` numpy (round to nearest, as diffusers' PIL output)."""
    return images.float().mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def generate_samples(
    pipe, plan: SamplePlan, indices: range, batch_size: int, **pipeline_kwargs
) -> Iterator[tuple[range, np.ndarray]]:
    """
    Generate the samples `indices` of `plan` with `pipe` (a `FlexVARPipeline`), `batch_size` consecutive samples per
    call, each with its own generator; yields `(batch indices, uint8 images (B, H, W, 3))`.

    `pipeline_kwargs` go to every call (size, scales, guidance, top-k, ...); `output_type` and `generator` are set
    here. The generators live where the pipeline samples, so the noise is drawn there.
    """
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    fast = pipe.fast_token_generator
    device = fast.device if fast is not None else pipe._execution_device
    for begin in range(indices.start, indices.stop, batch_size):
        batch = range(begin, min(begin + batch_size, indices.stop))
        images = pipe(
            plan.labels(batch), generator=plan.generators(batch, device), output_type="pt", **pipeline_kwargs
        ).images
        yield batch, to_uint8_images(images)


class SampleShards:
    """
    The shards of a plan's samples in `folder`: shard `k` holds samples `[k * shard_size, (k + 1) * shard_size)` as
    `shard-{k:06d}.npz` with `images` (uint8 `(n, H, W, 3)`), `labels` and `indices`. A shard file exists only once
    complete (written to a temporary name and renamed).

    Args:
        folder (`Path`): Where the shards live.
        plan (`SamplePlan`): The samples.
        shard_size (`int`): Samples per shard (the last shard may be shorter), > 0.
    """

    def __init__(self, folder: str | Path, plan: SamplePlan, shard_size: int):
        if not is_int(shard_size) or shard_size < 1:
            raise ValueError(f"`shard_size` must be a positive int, got {shard_size!r}.")
        self.folder, self.plan, self.shard_size = Path(folder), plan, shard_size
        self.num_shards = -(-plan.num_samples // shard_size)

    def indices(self, shard: int) -> range:
        """Sample indices of `shard`."""
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.plan.num_samples))

    def path(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:06d}.npz"

    def missing(self) -> list[int]:
        """Shards without a finished file, in order."""
        return [shard for shard in range(self.num_shards) if not self.path(shard).is_file()]

    def remove_temporaries(self) -> None:
        """Delete the temporary files of shards whose writing was cut off (this class's own names only)."""
        for path in self.folder.glob(".shard-*.npz.tmp-*"):
            path.unlink(missing_ok=True)

    def write(self, shard: int, images: np.ndarray) -> Path:
        """Save the images of `shard` (uint8 `(n, H, W, 3)`, n = its size), atomically."""
        indices = self.indices(shard)
        if len(images) != len(indices):
            raise ValueError(f"Shard {shard} holds {len(indices)} samples, got {len(images)} images.")
        arrays = dict(images=images, labels=np.asarray(self.plan.labels(indices), dtype=np.int64),
                      indices=np.asarray(indices, dtype=np.int64))

        def save(staging: Path) -> None:
            with open(staging, "wb") as file:  # a file object: `np.savez` would add ".npz" to the staging name
                np.savez(file, **arrays)

        return atomic_save(save, self.path(shard))

    def read(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """`(images, labels)` of a finished shard; ValueError if it does not hold the plan's samples."""
        with np.load(self.path(shard), allow_pickle=False) as data:
            images, labels, indices = data["images"], data["labels"], data["indices"]
        if indices.tolist() != list(self.indices(shard)) or labels.tolist() != self.plan.labels(self.indices(shard)):
            raise ValueError(f"{self.path(shard)} does not hold samples {self.indices(shard)} of this plan.")
        return images, labels

    def sample(self, shards: Sequence[int], pipe, batch_size: int, progress=None, **pipeline_kwargs) -> None:
        """Generate and write `shards` one after another (`generate_samples`); `progress.update(n)` per batch.
        Each shard is written by a background thread while the next one is sampled (at most one waits)."""
        with ThreadPoolExecutor(max_workers=1) as writer:
            pending = None
            for shard in shards:
                batches = []
                for _, images in generate_samples(pipe, self.plan, self.indices(shard), batch_size,
                                                  **pipeline_kwargs):
                    batches.append(images)
                    if progress is not None:
                        progress.update(len(images))
                if pending is not None:
                    pending.result()  # re-raises a failed write
                pending = writer.submit(self.write, shard, np.concatenate(batches))
            if pending is not None:
                pending.result()


def write_samples_npz(path: str | Path, shards: SampleShards, image_shape: tuple[int, int, int]) -> Path:
    """Join every shard into the ADM's sample batch at `path` (atomically): `arr_0` uint8 `(N, H, W, 3)` images and
    `arr_1` int64 `(N,)` labels, in sample order. `image_shape` is `(H, W, 3)`."""
    num_samples = shards.plan.num_samples
    images = (shards.read(shard)[0] for shard in range(shards.num_shards))
    labels = np.asarray(shards.plan.labels(range(num_samples)), dtype=np.int64)
    return write_npz(path, {
        "arr_0": ((num_samples, *image_shape), np.uint8, images),
        "arr_1": ((num_samples,), np.int64, [labels]),
    })
