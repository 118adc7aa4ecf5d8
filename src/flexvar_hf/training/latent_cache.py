"""VQ encoder latents of a training set, encoded once and reused every epoch (`examples/train.py --cache_latents`).

The frozen encoder maps an image to the same latent every time it sees the same pixels, so with a finite set of
augmentations (centre crops, with or without a horizontal flip) each (image, flip) pair needs one encoding for the
whole run. The multi-scale quantisation still runs every step, at that step's scales (`build_teacher_inputs(latents=
...)`). Random crops have no finite set of outcomes and are refused.

Latents are stored in the encoder's output dtype (bfloat16 under `--mixed_precision bf16`: 16 KiB per image and flip
at 256x256, so about 40 GiB for ImageNet with flips), one safetensors shard per process in the cache folder, and
loaded into memory by every process. A fingerprint of the data, resolution, VQ model and dtype is stored with them:
a later run (a resume) reuses the shards when it matches and encodes again otherwise.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..utils.io import atomic_save
from .data import EpochShuffleSampler, ImageDataset, ImageTransform, collate_examples, sample_seed, split_sample_key

__all__ = [
    "CachedLatentDataset",
    "build_latent_dataloader",
    "encode_latent_shard",
    "latent_cache_fingerprint",
    "load_latent_cache",
    "prepare_latent_cache",
]

SHARD_NAME = "latents-{rank:05d}-of-{world:05d}.safetensors"


def flip_variants(random_flip: bool) -> int:
    """Augmentation variants stored per image: 2 (as is, flipped) with random flips, else 1."""
    return 2 if random_flip else 1


def check_cacheable(transform: ImageTransform) -> None:
    """ValueError unless `transform` has a finite set of outcomes (a centre crop, optionally flipped)."""
    if transform.crop != "center":
        raise ValueError(
            "--cache_latents stores one latent per image and flip, so it needs centre crops: drop --random_crop."
        )


def latent_cache_fingerprint(
    dataset, resolution: tuple[int, int], random_flip: bool, vqvae, dtype: torch.dtype
) -> str:
    """A hex digest of what the cached latents depend on: the dataset (its `datasets` fingerprint and length), the
    resolution, the flip variants, the VQ model's config and encoder weights, and the encoder dtype."""
    weights = hashlib.sha256()
    for name, tensor in sorted({**vqvae.encoder.state_dict(), **vqvae.quant_conv.state_dict()}.items()):
        weights.update(name.encode())
        weights.update(tensor.detach().float().cpu().numpy().tobytes())
    description = {
        "dataset": getattr(dataset, "_fingerprint", None),
        "length": len(dataset),
        "resolution": list(resolution),
        "variants": flip_variants(random_flip),
        "vq_config": {key: value for key, value in vqvae.config.items() if not key.startswith("_")},
        "encoder": weights.hexdigest(),
        "dtype": str(dtype),
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()


@torch.no_grad()
def encode_latent_shard(
    image_dataset: ImageDataset,
    indices: list[int],
    vqvae,
    random_flip: bool,
    batch_size: int,
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode samples `indices` of `image_dataset` (whose transform must be a plain centre crop: the flips are made
    here) with `vqvae` in its dtype and device: returns the indices (n,) and latents (n, variants, code_dim, h, w) on
    the CPU, variant 1 being the horizontally flipped image (what `ImageTransform` flips, before encoding)."""
    check_cacheable(image_dataset.transform)
    if image_dataset.transform.random_flip:
        raise ValueError("Encode from a dataset without random flips; the flipped variant is made here.")
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(image_dataset, indices), batch_size=batch_size, num_workers=num_workers,
        collate_fn=collate_examples,
    )
    device, dtype = vqvae.device, vqvae.encoder.conv_in.weight.dtype
    shards = []
    for batch in loader:
        pixels = batch["pixel_values"].to(device, dtype)
        variants = [pixels, pixels.flip(-1)][: flip_variants(random_flip)]
        shards.append(torch.stack([vqvae.encode(variant).latents.cpu() for variant in variants], dim=1))
    return torch.tensor(indices, dtype=torch.long), torch.cat(shards)


def shard_path(folder: Path, rank: int, world: int) -> Path:
    return Path(folder) / SHARD_NAME.format(rank=rank, world=world)


def save_latent_shard(folder: Path, rank: int, world: int, indices: torch.Tensor, latents: torch.Tensor,
                      fingerprint: str) -> Path:
    """Write one process's shard atomically (temporary name, then rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"indices": indices.contiguous(), "latents": latents.contiguous()}
    return atomic_save(
        lambda tmp: save_file(tensors, tmp, metadata={"fingerprint": fingerprint}), shard_path(folder, rank, world)
    )


def shard_fingerprint(path: Path) -> str | None:
    """The fingerprint stored in a shard, or None if the file is missing or unreadable."""
    try:
        with safe_open(path, framework="pt") as file:
            return (file.metadata() or {}).get("fingerprint")
    except (OSError, ValueError, RuntimeError):
        return None


def load_latent_cache(folder: Path, world: int, num_samples: int, fingerprint: str) -> torch.Tensor | None:
    """All shards of `folder` written by a run of `world` processes, as one (num_samples, variants, code_dim, h, w)
    tensor ordered by sample index; None when a shard is missing, from other data (fingerprint) or incomplete."""
    paths = [shard_path(folder, rank, world) for rank in range(world)]
    if any(shard_fingerprint(path) != fingerprint for path in paths):
        return None
    latents, seen = None, torch.zeros(num_samples, dtype=torch.bool)
    for path in paths:
        with safe_open(path, framework="pt") as file:
            indices, shard = file.get_tensor("indices"), file.get_tensor("latents")
        if latents is None:
            latents = shard.new_empty((num_samples, *shard.shape[1:]))
        latents[indices] = shard
        seen[indices] = True
    return latents if bool(seen.all()) else None


class CachedLatentDataset(torch.utils.data.Dataset):
    """Cached latents (and labels) as the training set: items `{"latents": (code_dim, h, w), "labels": int}`.

    Keys are sample indices or `(index, epoch)` pairs from `EpochShuffleSampler`. With two variants per image, the
    flip is drawn as `ImageTransform` draws it for a centre crop (its only draw: a uniform below 0.5 from a
    generator seeded by `sample_seed(seed, epoch, index)`), so a run with the cache sees the same flips as one
    without it.
    """

    def __init__(self, latents: torch.Tensor, labels: torch.Tensor | None = None, seed: int | None = 0):
        if labels is not None and len(labels) != len(latents):
            raise ValueError(f"{len(latents)} cached latents but {len(labels)} labels.")
        self.latents = latents
        self.labels = labels
        self.seed = seed

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = split_sample_key(key)
        variant = 0
        if self.latents.shape[1] > 1:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
            variant = int(torch.rand(1, generator=generator).item() < 0.5)
        item = {"latents": self.latents[index, variant]}
        if self.labels is not None:
            item["labels"] = int(self.labels[index])
        return item


def collate_latents(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack `latents` and `labels` (int64) of a list of `CachedLatentDataset` items."""
    batch = {"latents": torch.stack([example["latents"] for example in examples])}
    if "labels" in examples[0]:
        batch["labels"] = torch.tensor([example["labels"] for example in examples], dtype=torch.long)
    return batch


def build_latent_dataloader(
    dataset: CachedLatentDataset, batch_size: int, seed: int | None = 0, num_workers: int = 0, pin_memory: bool = False
) -> torch.utils.data.DataLoader:
    """A shuffled `DataLoader` over cached latents with an `EpochShuffleSampler`, like `data.build_dataloader`: the
    same sample order for the same seed and epoch."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochShuffleSampler(len(dataset), seed=seed),
        num_workers=num_workers,
        collate_fn=collate_latents,
        pin_memory=pin_memory,
    )


def prepare_latent_cache(
    accelerator,
    folder: Path,
    image_dataset: ImageDataset,
    vqvae,
    random_flip: bool,
    batch_size: int,
    num_workers: int = 0,
) -> torch.Tensor:
    """
    The (num_samples, variants, code_dim, h, w) latents of `image_dataset` (a centre-crop transform without flips)
    for every process of `accelerator`: loaded from `folder` when its shards match this data and VQ model, else
    encoded (each process its share of the samples, `vqvae` in its device and dtype), saved and loaded. Every process
    must call it.
    """
    resolution = (image_dataset.transform.height, image_dataset.transform.width)
    dtype = vqvae.encoder.conv_in.weight.dtype
    fingerprint = latent_cache_fingerprint(image_dataset.dataset, resolution, random_flip, vqvae, dtype)
    world, rank, count = accelerator.num_processes, accelerator.process_index, len(image_dataset)
    latents = load_latent_cache(folder, world, count, fingerprint)
    missing = torch.tensor([float(latents is None)], device=accelerator.device)
    if accelerator.gather(missing).max().item() > 0:
        indices, shard = encode_latent_shard(
            image_dataset, list(range(rank, count, world)), vqvae, random_flip, batch_size, num_workers
        )
        save_latent_shard(folder, rank, world, indices, shard, fingerprint)
        accelerator.wait_for_everyone()
        latents = load_latent_cache(folder, world, count, fingerprint)
    if latents is None:
        raise RuntimeError(f"The latent cache in {folder} is incomplete after encoding.")
    return latents
