"""Training: data helpers, the FlexVAR loss, parameter groups, atomic checkpoints and `examples/train.py` end to end.

Everything runs on the CPU with tiny models saved with `save_pretrained` and a tiny imagefolder of coloured shapes
drawn here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from huggingface_hub import ModelCard
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from flexvar_hf import FlexVARPipeline, FlexVARScaleScheduler, FlexVARTransformer2DModel, FlexVQModel
from flexvar_hf.training import checkpointing as ckpt
from flexvar_hf.training.data import (
    EpochShuffleSampler,
    ImageDataset,
    ImageTransform,
    LabelInfo,
    build_dataloader,
    check_data_args,
    check_labels,
    image_problem,
    label_info,
    load_image_dataset,
    parse_resolution,
    set_dataloader_epoch,
)
from flexvar_hf.training.flexvar_loss import (
    build_teacher_inputs,
    drop_class_labels,
    flexvar_loss,
    mix_tokens_across_images,
    scale_token_weights,
    token_accuracy,
)
from flexvar_hf.training.optim import (
    build_optimizer,
    flexvar_lr_factor,
    flexvar_warmup_steps,
    no_decay_parameter_names,
    parameter_groups,
)
from flexvar_hf.utils.io import check_output_path

from conftest import RELATIVE_TOLERANCE, REPO_ROOT, load_example, relative_error, with_active_blocks

CLASSES = ("circle", "square", "triangle")
TINY_VQ = dict(
    base_channels=8,
    channel_multipliers=(1, 1, 2, 2, 4),
    layers_per_block=1,
    z_channels=8,
    num_codes=64,
    code_dim=8,
    norm_num_groups=4,
)


# ----------------------------------------------------------------------------------------------------------------
# Fixtures


def draw_shape(kind: str, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    background = tuple(int(c) for c in rng.integers(0, 120, 3))
    colour = tuple(int(c) for c in rng.integers(130, 256, 3))
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    width, height = size
    radius = int(rng.integers(12, 22))
    cx, cy = int(rng.integers(radius, width - radius)), int(rng.integers(radius, height - radius))
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    return image


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """An imagefolder of 3 shape classes x 4 images of assorted sizes, a tiny VQ model and a tiny 3-class pipeline."""
    root = tmp_path_factory.mktemp("training")
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (80, 64), (64, 96), (72, 72)]
    for kind in CLASSES:
        (root / "shapes" / kind).mkdir(parents=True)
        for index, size in enumerate(sizes):
            draw_shape(kind, rng, size).save(root / "shapes" / kind / f"{index}.png")
    torch.manual_seed(0)
    vqvae = FlexVQModel(**TINY_VQ)
    vqvae.save_pretrained(root / "vq")
    transformer = with_active_blocks(FlexVARTransformer2DModel(
        num_classes=3, vocab_size=64, code_dim=8, num_layers=1, hidden_size=32, num_attention_heads=2, pos_grid_size=4
    ))
    FlexVARPipeline(transformer, vqvae, FlexVARScaleScheduler(), id2label={0: "a", 1: "b", 2: "c"}).save_pretrained(
        root / "pipe"
    )
    (root / "transformer.json").write_text(json.dumps({"num_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                                                       "pos_grid_size": 4}))
    return {"root": root, "data": root / "shapes", "vq": root / "vq", "pipe": root / "pipe",
            "config": root / "transformer.json"}


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state, so that the next Accelerator starts afresh (as in a new process)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


@pytest.fixture(scope="module")
def train_script():
    return load_example("train")


def scratch_args(assets, output_dir, *extra) -> list[str]:
    return [
        "--vqvae_model_name_or_path", str(assets["vq"]), "--depth", "1", "--train_data_dir", str(assets["data"]),
        "--resolution", "64", "--train_batch_size", "4", "--output_dir", str(output_dir), "--report_to", "none",
        "--learning_rate", "1e-3", "--no-scale_lr", "--lr_scheduler", "constant", "--checkpointing_steps", "1000",
        *extra,
    ]


# ----------------------------------------------------------------------------------------------------------------
# Data


def test_parse_resolution():
    assert parse_resolution("256") == (256, 256)
    assert parse_resolution("128x256") == (128, 256)
    assert parse_resolution(64) == (64, 64)
    assert parse_resolution((32, 48)) == (32, 48)
    for bad in ("70", "256x100", "abc", "0", "16x16x16", -16):
        with pytest.raises(ValueError, match="resolution"):
            parse_resolution(bad)


def test_image_transform_resize_crop_flip():
    # Left half white, right half black, 100 wide and 50 tall.
    array = np.zeros((50, 100, 3), dtype=np.uint8)
    array[:, :50] = 255
    image = Image.fromarray(array)

    center = ImageTransform(32)(image)
    assert center.shape == (3, 32, 32) and center.dtype == torch.float32
    assert center.min() >= -1 and center.max() <= 1
    # Resized to 64x32 then the centre 32 columns: white left half, black right half.
    assert torch.all(center[:, :, :14] > 0.9) and torch.all(center[:, :, 18:] < -0.9)

    flip = ImageTransform(32, random_flip=True)
    flips = [flip(image, torch.Generator().manual_seed(seed))[0, 0, 0].item() for seed in range(40)]
    assert {round(v) for v in flips} == {-1, 1}  # both orientations occur
    assert 8 <= sum(v < 0 for v in flips) <= 32

    random_crop = ImageTransform((32, 32), crop="random", min_crop_fraction=0.5)
    first = random_crop(image, torch.Generator().manual_seed(3))
    again = random_crop(image, torch.Generator().manual_seed(3))
    assert torch.equal(first, again)  # reproducible from the generator
    assert len({random_crop(image, torch.Generator().manual_seed(s)).sum().item() for s in range(8)}) > 1

    tall = ImageTransform((48, 16))(Image.fromarray(array))
    assert tall.shape == (3, 48, 16)
    with pytest.raises(ValueError):
        ImageTransform(32, crop="left")


def test_load_dataset_labels_and_errors(assets, tmp_path):
    dataset = load_image_dataset(train_data_dir=assets["data"], label_column="label")
    assert len(dataset) == 12 and dataset.column_names == ["image", "label"]
    info = label_info(dataset, "label")
    assert info.num_classes == 3 and info.labels == [0, 1, 2]
    assert info.id2label == dict(enumerate(sorted(CLASSES)))
    check_labels(info, 3)
    with pytest.raises(ValueError, match=r"outside the model's 2 classes.*\[2\]"):
        check_labels(info, 2)
    with pytest.raises(ValueError, match=r"\[-1\]"):
        check_labels(LabelInfo(3, None, [-1, 0]), 3)

    subset = load_image_dataset(train_data_dir=assets["data"], label_column="label", max_train_samples=5, seed=1)
    assert len(subset) == 5

    with pytest.raises(ValueError, match="does not exist"):
        load_image_dataset(train_data_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match="exactly one"):
        load_image_dataset()
    with pytest.raises(ValueError, match="exactly one"):
        load_image_dataset(dataset_name="x", train_data_dir=assets["data"])
    with pytest.raises(ValueError, match=r"--label_column 'class'.*\['image', 'label'\]"):
        load_image_dataset(train_data_dir=assets["data"], label_column="class")
    with pytest.raises(ValueError, match="--image_column 'img'"):
        load_image_dataset(train_data_dir=assets["data"], image_column="img")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_image_dataset(train_data_dir=tmp_path / "empty")

    args = argparse.Namespace(dataset_name=None, train_data_dir=str(tmp_path / "missing"), resolution="64")
    with pytest.raises(ValueError, match="not an existing folder"):
        check_data_args(args)
    args.train_data_dir = str(assets["data"])
    assert check_data_args(args) == (64, 64)
    args.random_crop = args.center_crop = True
    with pytest.raises(ValueError, match="at most one"):
        check_data_args(args)


def test_folders_without_two_classes_get_the_right_message(assets, tmp_path):
    """imagefolder drops the label column of a folder with one class: the message says so, not that a
    --label_column the user never set is missing."""
    one_class, flat = tmp_path / "one", tmp_path / "flat"
    shutil.copytree(assets["data"] / "circle", one_class / "circle")
    shutil.copytree(assets["data"] / "circle", flat)
    with pytest.raises(ValueError, match=r"only one class sub-folder \('circle'\).*at least two") as error:
        load_image_dataset(train_data_dir=one_class, label_column="label")
    assert "--label_column" not in str(error.value)
    with pytest.raises(ValueError, match="has no class sub-folders"):
        load_image_dataset(train_data_dir=flat, label_column="label")
    assert len(load_image_dataset(train_data_dir=one_class)) == 4  # without labels (train_vq.py) it is fine


def broken_image_folder(assets, root: Path) -> Path:
    """The shapes folder with two unreadable files: one that is no image at all, one PNG cut in half."""
    data = root / "shapes"
    shutil.copytree(assets["data"], data)
    (data / "circle" / "garbage.png").write_bytes(b"this is not an image")
    whole = (data / "square" / "0.png").read_bytes()
    (data / "square" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    return data


def test_unreadable_images_are_found_before_training(assets, tmp_path, caplog):
    data = broken_image_folder(assets, tmp_path)
    with pytest.raises(ValueError, match=r"2 of the 14 images cannot be read: .*garbage\.png.*truncated\.png"):
        load_image_dataset(train_data_dir=data, label_column="label")
    with caplog.at_level("WARNING"):
        kept = load_image_dataset(train_data_dir=data, label_column="label", image_check="skip")
    assert len(kept) == 12 and "Leaving out 2 unreadable images" in caplog.text
    train = ImageDataset(kept, ImageTransform(64), "image", "label")
    assert all(torch.isfinite(train[index]["pixel_values"]).all() for index in range(len(kept)))

    import datasets

    unchecked = load_image_dataset(train_data_dir=data, label_column="label", image_check="off")
    assert len(unchecked) == 14
    train = ImageDataset(unchecked, ImageTransform(64), "image", "label")
    undecoded = unchecked.cast_column("image", datasets.Image(decode=False))
    bad = [index for index in range(len(unchecked)) if image_problem(undecoded[index]["image"])]
    assert len(bad) == 2
    with pytest.raises(ValueError, match=f"Image {bad[0]} of column 'image' cannot be read"):
        train[bad[0]]
    # An unknown check is refused before any loading (here the folder would not even be found).
    with pytest.raises(ValueError, match=r"`image_check` must be one of \('stop', 'skip', 'off'\), got 'maybe'"):
        load_image_dataset(train_data_dir=tmp_path / "missing", label_column="label", image_check="maybe")


def test_integer_label_column_without_names():
    import datasets

    dataset = datasets.Dataset.from_dict({"label": [4, 0, 2]})
    info = label_info(dataset, "label")
    assert (info.num_classes, info.id2label, info.labels) == (5, None, [0, 2, 4])
    with pytest.raises(ValueError, match="integer class ids"):
        label_info(datasets.Dataset.from_dict({"label": [0.5, 1.0]}), "label")


def test_sampler_and_dataset_are_seeded_by_epoch_and_index(assets):
    dataset = load_image_dataset(train_data_dir=assets["data"], label_column="label")
    transform = ImageTransform(64, crop="random", random_flip=True, min_crop_fraction=0.8)
    train = ImageDataset(dataset, transform, "image", "label", seed=5)
    assert torch.equal(train[(3, 1)]["pixel_values"], train[(3, 1)]["pixel_values"])
    assert not torch.equal(train[(3, 1)]["pixel_values"], train[(3, 2)]["pixel_values"])
    assert train[(3, 1)]["labels"] == dataset[3]["label"]

    sampler = EpochShuffleSampler(12, seed=5)
    epoch0 = [index for index, _ in sampler]
    sampler.set_epoch(1)
    epoch1 = [index for index, _ in sampler]
    assert sorted(epoch0) == sorted(epoch1) == list(range(12)) and epoch0 != epoch1
    assert {epoch for _, epoch in sampler} == {1}
    sampler.set_epoch(0)  # accelerate's pass counter restarting at 0 must not move a resumed run back
    assert sampler.epoch == 1
    assert [index for index, _ in EpochShuffleSampler(12, seed=5)] == epoch0


def test_resumed_epoch_through_accelerate_gets_the_same_batches(assets, fresh_accelerate):
    """A loader prepared by accelerate and cut with skip_first_batches yields the rest of the right epoch."""
    from accelerate import Accelerator

    dataset = load_image_dataset(train_data_dir=assets["data"], label_column="label")
    train = ImageDataset(dataset, ImageTransform(64, crop="random", random_flip=True), "image", "label", seed=2)

    def batches(epoch: int, skip: int) -> list[torch.Tensor]:
        accelerator = Accelerator(cpu=True)
        loader = accelerator.prepare(build_dataloader(train, 3, seed=2))
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        set_dataloader_epoch(epoch_loader, epoch)
        return [batch["pixel_values"] for batch in epoch_loader]

    straight = batches(2, 0)
    resumed = batches(2, 2)
    assert len(straight) == 4 and len(resumed) == 2
    assert all(torch.equal(a, b) for a, b in zip(straight[2:], resumed))
    assert not torch.equal(batches(1, 0)[0], straight[0])


# ----------------------------------------------------------------------------------------------------------------
# Loss, accuracy, label dropout, teacher inputs


def test_loss_and_accuracy_numbers():
    vocab, smoothing = 16, 0.1
    targets = torch.randint(vocab, (2, 5), generator=torch.Generator().manual_seed(0))
    # The optimum of the smoothed loss is the smoothed target distribution itself; its entropy is the floor.
    smoothed = torch.full((2, 5, vocab), smoothing / vocab)
    smoothed.scatter_(-1, targets[..., None], 1 - smoothing + smoothing / vocab)
    floor = -(smoothed[0, 0] * smoothed[0, 0].log()).sum()
    loss = flexvar_loss(smoothed.log(), targets, label_smoothing=smoothing)
    assert loss.item() == pytest.approx(floor.item(), abs=1e-5) and floor > 0.3
    assert flexvar_loss(smoothed.log() * 1.5, targets, label_smoothing=smoothing) > loss + 1e-3
    accuracy, last = token_accuracy(smoothed.log(), targets, last_scale_tokens=4)
    assert accuracy.item() == 1.0 and last.item() == 1.0

    perfect = torch.nn.functional.one_hot(targets, vocab).float() * 50
    assert flexvar_loss(perfect, targets).item() < 1e-6
    assert flexvar_loss(torch.zeros(2, 5, vocab), targets).item() == pytest.approx(math.log(vocab), rel=1e-6)

    # Wrong only on the last 4 tokens of each row (the last scale).
    wrong = perfect.clone()
    wrong[:, 1:] = torch.roll(perfect[:, 1:], 1, dims=-1)
    accuracy, last = token_accuracy(wrong, targets, last_scale_tokens=4)
    assert accuracy.item() == pytest.approx(0.2) and last.item() == 0.0
    with pytest.raises(ValueError, match="do not match"):
        flexvar_loss(perfect[:, :4], targets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_row_cross_entropy_is_float32_cross_entropy_over_chunks(monkeypatch, dtype, smoothing):
    """Losses and gradients of `row_cross_entropy` equal `F.cross_entropy` on float32 copies of the logits, across
    chunk boundaries (37 rows in chunks of 4), with the gradient in the logits' dtype."""
    from flexvar_hf.training import cross_entropy

    monkeypatch.setattr(cross_entropy, "CHUNK_VALUES", 200)  # 4 rows of 50 per chunk
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, 50, generator=generator) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (37,), generator=generator)
    upstream = torch.randn(37, generator=generator)
    losses = cross_entropy.row_cross_entropy(logits, targets, smoothing)
    (losses * upstream).sum().backward()
    grad, logits.grad = logits.grad, None
    expected = torch.nn.functional.cross_entropy(logits.float(), targets, label_smoothing=smoothing, reduction="none")
    (expected * upstream).sum().backward()
    assert losses.dtype == torch.float32 and grad.dtype == dtype
    assert torch.allclose(losses, expected, rtol=1e-6, atol=1e-5)
    assert torch.allclose(grad.float(), logits.grad.float(), rtol=1e-5, atol=1e-6)
    double = torch.randn(5, 7, dtype=torch.float64, requires_grad=True, generator=generator)
    assert torch.autograd.gradcheck(lambda x: cross_entropy.row_cross_entropy(x, targets[:5] % 7, 0.2), (double,))


def test_compiled_cross_entropy_is_the_chunked_one(monkeypatch):
    """`row_cross_entropy(compiled=True)` (train.py's `--torch_compile`): the chunked losses and bfloat16 gradients
    to float32 rounding, for any number of rows from one compiled graph per direction (each training schedule has
    its own row count)."""
    from torch._dynamo.utils import counters

    from flexvar_hf.training import cross_entropy

    monkeypatch.setattr(cross_entropy, "CHUNK_VALUES", 200)  # the eager reference in chunks of 4 rows of 50
    generator = torch.Generator().manual_seed(0)
    graphs_before = counters["stats"]["unique_graphs"]
    for rows in (37, 61, 90):
        logits = (torch.randn(rows, 50, generator=generator) * 3).bfloat16().requires_grad_()
        targets = torch.randint(0, 50, (rows,), generator=generator)
        upstream = torch.randn(rows, generator=generator)
        results = {}
        for compiled in (False, True):
            losses = cross_entropy.row_cross_entropy(logits, targets, 0.1, compiled=compiled)
            (losses * upstream).sum().backward()
            results[compiled], logits.grad = (losses.detach(), logits.grad), None
        (eager_losses, eager_grad), (losses, grad) = results[False], results[True]
        assert losses.dtype == torch.float32 and grad.dtype == torch.bfloat16
        torch.testing.assert_close(losses, eager_losses, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(grad.float(), eager_grad.float(), rtol=1e-2, atol=1e-7)  # a bf16 unit at most
    assert counters["stats"]["unique_graphs"] - graphs_before == 2


def test_row_cross_entropy_saves_no_float32_copy_of_the_logits():
    """What the backward pass keeps: bfloat16 logits and a value per row, not the (N, V) float32 log-probabilities
    that `F.cross_entropy(logits.float())` saves."""
    from flexvar_hf.training.cross_entropy import row_cross_entropy

    logits = torch.randn(64, 100).bfloat16().requires_grad_()
    targets = torch.randint(0, 100, (64,))

    def saved_float32_values(loss_function) -> int:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss_function()
        return sum(t.numel() for t in saved if t.dtype == torch.float32)

    assert saved_float32_values(lambda: row_cross_entropy(logits, targets)) == 64
    assert saved_float32_values(lambda: torch.nn.functional.cross_entropy(logits.float(), targets)) >= 64 * 100
    with pytest.raises(ValueError, match="must be \\(N, V\\)"):
        row_cross_entropy(logits[None], targets)
    with pytest.raises(ValueError, match="label_smoothing"):
        row_cross_entropy(logits, targets, 1.5)


def test_scale_weighted_loss_numbers():
    scales = [(1, 1), (2, 2), (3, 4)]  # 1 + 4 + 12 = 17 tokens
    assert torch.equal(scale_token_weights(scales, 0.0), torch.ones(17))
    equal_scales = scale_token_weights(scales, 1.0)
    assert equal_scales.mean().item() == pytest.approx(1.0)
    # Power 1: each scale's tokens carry the same total weight, 17 / 3.
    totals = [chunk.sum().item() for chunk in equal_scales.split([1, 4, 12])]
    assert totals == pytest.approx([17 / 3] * 3)
    half = scale_token_weights(scales, 0.5)
    assert half[0] / half[-1] == pytest.approx(12**0.5) and half.mean().item() == pytest.approx(1.0)

    logits = torch.randn(3, 17, 16, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(16, (3, 17), generator=torch.Generator().manual_seed(1))
    unweighted = flexvar_loss(logits, targets)
    torch.testing.assert_close(flexvar_loss(logits, targets, token_weights=torch.ones(17)), unweighted)
    per_scale = [
        torch.nn.functional.cross_entropy(chunk_logits.flatten(0, 1), chunk_targets.flatten())
        for chunk_logits, chunk_targets in zip(logits.split([1, 4, 12], 1), targets.split([1, 4, 12], 1))
    ]
    weighted = flexvar_loss(logits, targets, token_weights=equal_scales)
    torch.testing.assert_close(weighted, torch.stack(per_scale).mean())
    assert abs(weighted - unweighted) > 1e-3
    with pytest.raises(ValueError, match=r"`token_weights` must have shape \(17,\)"):
        flexvar_loss(logits, targets, token_weights=equal_scales[:16])
    for power in (-0.5, float("nan")):
        with pytest.raises(ValueError, match="`power` must be a number >= 0"):
            scale_token_weights(scales, power)


def test_class_label_dropout_rate():
    labels = torch.randint(10, (40_000,), generator=torch.Generator().manual_seed(1))
    dropped = drop_class_labels(labels, 10, 0.1, generator=torch.Generator().manual_seed(2))
    changed = dropped != labels
    assert torch.all(dropped[changed] == 10)
    assert torch.equal(dropped[~changed], labels[~changed])
    # Binomial(40000, 0.1): standard deviation 0.0015 of the rate; 5 sigma.
    assert abs(changed.float().mean().item() - 0.1) < 0.0075
    assert torch.equal(dropped, drop_class_labels(labels, 10, 0.1, generator=torch.Generator().manual_seed(2)))
    assert torch.equal(drop_class_labels(labels, 10, 0.0), labels)
    assert torch.all(drop_class_labels(labels[:50], 10, 1.0) == 10)
    with pytest.raises(ValueError):
        drop_class_labels(labels, 10, 1.5)


def test_mix_tokens_across_images_rate_donors_and_seeding():
    indices = torch.randint(50, (4, 100, 100), generator=torch.Generator().manual_seed(0))
    mixed = mix_tokens_across_images(indices, 0.3, generator=torch.Generator().manual_seed(1))
    # A replaced token keeps its value when the donor has the same one (1/50), so the changed rate is
    # 0.3 * 49/50 = 0.294; 40,000 tokens give a standard deviation of 0.0023, 5 sigma.
    changed = mixed != indices
    assert abs(changed.float().mean().item() - 0.294) < 0.0115
    # Each changed token is another image's token at the same position.
    from_others = (mixed.unsqueeze(1) == indices.unsqueeze(0)) & ~torch.eye(4, dtype=torch.bool).view(4, 4, 1, 1)
    assert from_others.any(dim=1)[changed].all()
    assert torch.equal(mixed, mix_tokens_across_images(indices, 0.3, generator=torch.Generator().manual_seed(1)))
    pair = mix_tokens_across_images(indices[:2], 1.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(pair, indices[:2].flip(0))  # two images: every token comes from the other one
    assert torch.equal(mix_tokens_across_images(indices, 0.0), indices)
    for prob in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"`prob` must be in \[0, 1\]"):
            mix_tokens_across_images(indices, prob)
    with pytest.raises(ValueError, match="at least 2 images"):
        mix_tokens_across_images(indices[:1], 0.5)


def test_teacher_inputs_with_token_noise_keep_the_targets(parity_vq, reference):
    scales = [(1, 1), (2, 2), (3, 3), (4, 4)]
    clean = build_teacher_inputs(parity_vq, scales, pixels=reference["image"])

    def noisy(prob, seed=0):
        generator = torch.Generator().manual_seed(seed)
        return build_teacher_inputs(
            parity_vq, scales, pixels=reference["image"], input_token_noise=prob, generator=generator
        )

    assert torch.equal(noisy(0.0).scale_inputs, clean.scale_inputs)
    half = noisy(0.5)
    assert torch.equal(half.targets, clean.targets)  # the model still learns the true tokens
    assert torch.equal(half.scale_inputs, noisy(0.5).scale_inputs)
    assert not torch.equal(half.scale_inputs, noisy(0.5, seed=1).scale_inputs)
    # Two images and probability 1: every input scale of each image is built from the other image's tokens.
    assert torch.equal(noisy(1.0).scale_inputs, clean.scale_inputs.flip(0))


def test_teacher_inputs_match_the_pipeline_and_the_original(parity_vq, reference):
    pipe = FlexVARPipeline(
        FlexVARTransformer2DModel(num_classes=2, vocab_size=parity_vq.config.num_codes, code_dim=32, num_layers=1,
                                  hidden_size=32, num_attention_heads=2),
        parity_vq,
        FlexVARScaleScheduler(),
    )
    scales = [(1, 1), (2, 2), (3, 3), (4, 4)]
    teacher = build_teacher_inputs(parity_vq, scales, pixels=reference["image"])

    # The original trainer's inputs and targets for the fixture image at train_pns [1, 2, 3, 4].
    assert torch.equal(teacher.targets, reference["teacher_targets"])
    assert relative_error(teacher.scale_inputs, reference["teacher_inputs"]) < RELATIVE_TOLERANCE

    # Exactly what generation feeds: each scale's tokens through `next_scale_inputs` to the next scale (also for
    # grids taller than wide and wider than tall, which the one lookup for all scales must unflatten as h x w).
    latents = parity_vq.encode(reference["image"]).latents
    for schedule in (scales, [(1, 2), (3, 2), (2, 3), (4, 4)]):
        teacher = build_teacher_inputs(parity_vq, schedule, latents=latents)
        indices = parity_vq.quantize_multiscale(latents, schedule)
        offset = 0
        for scale_indices, next_scale in zip(indices[:-1], schedule[1:]):
            expected = pipe.next_scale_inputs(scale_indices, next_scale)
            length = next_scale[0] * next_scale[1]
            assert torch.equal(teacher.scale_inputs[:, offset : offset + length], expected)
            offset += length
        assert offset == teacher.scale_inputs.shape[1]
        assert teacher.last_scale_tokens == 16

    # Non-square scales and already encoded latents give the same.
    wide = [(1, 1), (1, 2), (2, 4)]
    top = reference["image"][..., :32, :]
    from_latents = build_teacher_inputs(parity_vq, wide, latents=parity_vq.encode(top).latents)
    from_pixels = build_teacher_inputs(parity_vq, wide, pixels=top)
    assert torch.equal(from_latents.targets, from_pixels.targets)
    assert from_pixels.scale_inputs.shape == (2, 2 + 8, 32)
    with pytest.raises(ValueError, match="exactly one"):
        build_teacher_inputs(parity_vq, wide)


# ----------------------------------------------------------------------------------------------------------------
# Optimiser


# The original train.py's `nowd_keys` and the rule of its utils/lr_control.py `filter_params`, restated: no weight
# decay for 1-d parameters, biases and names containing a key; everything else (the class embedding too) decayed.
ORIGINAL_NOWD_KEYS = (
    "cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start", "start_pos",
    "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul",
)


def original_filter_no_decay(name: str, tensor: torch.Tensor) -> bool:
    return tensor.ndim == 1 or name.endswith("bias") or any(key in name for key in ORIGINAL_NOWD_KEYS)


def test_parameter_groups_are_the_original_filter():
    from flexvar_hf.conversion import TRANSFORMER_RULES, _original_name, transformer_state_dict_to_original

    model = FlexVARTransformer2DModel(
        num_classes=3, vocab_size=64, code_dim=8, num_layers=2, hidden_size=32, num_attention_heads=2, pos_grid_size=4
    )
    original = transformer_state_dict_to_original(model.state_dict())
    buffers = {name for name in original if name.endswith(("attn_bias_for_masking", "zero_k_bias"))}
    expected = {
        name for name, tensor in original.items() if name not in buffers and original_filter_no_decay(name, tensor)
    }
    no_decay = no_decay_parameter_names(model)
    assert {_original_name(name, TRANSFORMER_RULES) for name in no_decay} == expected
    assert "class_embed.weight" not in no_decay and {"start_token", "pos_grid", "blocks.1.attn.log_scale"} <= no_decay

    groups = parameter_groups(model, 0.05)
    assert [group["weight_decay"] for group in groups] == [0.05, 0.0]
    decayed = {name for name, _ in model.named_parameters()} - no_decay
    assert set(groups[0]["names"]) == decayed and set(groups[1]["names"]) == no_decay
    assert sum(len(group["params"]) for group in groups) == len(list(model.parameters()))
    # --exclude_embeddings_from_weight_decay: the one deliberate difference, off by default.
    assert no_decay_parameter_names(model, decay_embeddings=False) == no_decay | {"class_embed.weight"}

    layers = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Embedding(3, 4))
    layers[0].requires_grad_(False)
    assert no_decay_parameter_names(layers) == {"1.weight", "1.bias"}
    assert len(parameter_groups(layers, 0.1)) == 2  # the frozen Linear is left out; the embedding is decayed

    optimizer = build_optimizer(model, 1e-4)
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.05, 0.0]


def test_learning_rate_schedule_is_the_originals_lin0():
    # Values of the original's lr_wd_annealing("lin0", peak 1, wp0=0.005, wpe=0.1) at iterations of a 1001-iteration
    # run with wp_it = 20, worked out from its formula: warmup 0.005 + 0.995 * it / 20; then with
    # pasd = (it - 20) / 980, 1 below pasd 0.05 (it < 69), else 0.1 + 0.9 * (1 - pasd) / 0.95.
    expected = {0: 0.005, 10: 0.5025, 19: 0.95025, 20: 1.0, 68: 1.0, 69: 0.1 + 0.9 * (1 - 49 / 980) / 0.95,
                500: 0.1 + 0.9 * (1 - 480 / 980) / 0.95, 1000: 0.1}
    for step, value in expected.items():
        assert flexvar_lr_factor(step, 1001, 20, end_fraction=0.1) == pytest.approx(value, rel=1e-12), step
    assert flexvar_lr_factor(5000, 1001, 20, end_fraction=0.1) == pytest.approx(0.1)  # past the end: stays there
    assert flexvar_warmup_steps(1001) == 20 and flexvar_warmup_steps(10) == 0
    # Its weight-decay schedule goes from --twd to --twde by a cosine, and --twde defaults to --twd: constant 0.05,
    # what our parameter groups keep. (No command of the original sets --twde.)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


class Counter:
    """A registered object: anything with state_dict/load_state_dict (like diffusers' EMAModel)."""

    def __init__(self):
        self.value = 0

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def test_checkpoint_save_prune_latest_resume_and_killed_save(tmp_path, fresh_accelerate, monkeypatch):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    counter = Counter()
    accelerator.register_for_checkpointing(counter)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)

    def train_step():
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    weights = {}
    for step in (1, 2, 3):
        train_step()
        counter.value = step * 10
        path = ckpt.save_checkpoint(accelerator, tmp_path, step, total_limit=2, state={"epoch": step // 2})
        assert path == tmp_path / f"checkpoint-{step}"
        weights[step] = model.weight.detach().clone()
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]  # checkpoint-1 pruned after the save
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"
    assert json.loads((tmp_path / "checkpoint-3" / ckpt.STATE_FILE).read_text()) == {"global_step": 3, "epoch": 1}

    # A save killed half-way leaves a temporary folder that `latest` ignores, and the older checkpoints intact.
    def killed(output_dir, **kwargs):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(accelerator, "save_state", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(accelerator, tmp_path, 4, total_limit=2)
    monkeypatch.undo()
    assert (tmp_path / ".checkpoint-4.tmp").is_dir() and not (tmp_path / "checkpoint-4").exists()
    (tmp_path / "checkpoint-9").mkdir()  # no training_state.json: not a checkpoint
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"
    assert ckpt.resolve_checkpoint("latest", tmp_path) == tmp_path / "checkpoint-3"
    with pytest.raises(ValueError, match="not a complete training checkpoint"):
        ckpt.resolve_checkpoint("checkpoint-9", tmp_path)

    # Resume from checkpoint-2: model, optimizer and registered object come back.
    train_step()
    counter.value = -1
    state = ckpt.load_checkpoint(accelerator, ckpt.resolve_checkpoint("checkpoint-2", tmp_path))
    assert state == {"global_step": 2, "epoch": 1}
    assert torch.equal(model.weight, weights[2]) and counter.value == 20
    train_step()
    assert torch.equal(model.weight, weights[3])  # the optimizer state was restored too

    # A new save of a step cleans its stale temporary folder.
    ckpt.save_checkpoint(accelerator, tmp_path, 4, total_limit=None)
    assert not (tmp_path / ".checkpoint-4.tmp").exists() and ckpt.latest_checkpoint(tmp_path).name == "checkpoint-4"

    assert ckpt.resolve_checkpoint(None, tmp_path) is None
    assert ckpt.resolve_checkpoint("latest", tmp_path / "fresh") is None
    with pytest.raises(ValueError, match="does not exist"):
        ckpt.resolve_checkpoint(str(tmp_path / "checkpoint-77"), tmp_path)
    assert ckpt.resume_position(0, 5, 2) == (0, 0)
    assert ckpt.resume_position(7, 3, 2) == (2, 2)
    assert ckpt.resume_position(6, 3, 1) == (2, 0)


# ----------------------------------------------------------------------------------------------------------------
# examples/train.py


def read_tensorboard(log_dir: Path) -> tuple[dict[str, list[float]], list[str]]:
    """Scalars by tag and the image tags of every event file under `log_dir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images = {}, []
    for events in log_dir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars[tag] = [event.value for event in accumulator.Scalars(tag)]
        images += accumulator.Tags()["images"]
    return scalars, images


def test_overfit_one_batch_saves_a_working_pipeline(assets, tmp_path, train_script, fresh_accelerate):
    out = tmp_path / "run"
    args = train_script.parse_args(
        scratch_args(assets, out, "--max_train_samples", "4", "--max_train_steps", "25", "--learning_rate", "5e-3",
                     "--class_dropout_prob", "0", "--report_to", "tensorboard", "--validation_steps", "25",
                     "--validation_class_labels", "0", "square", "--validation_num_inference_steps", "3")
    )
    result = train_script.main(args)
    losses = result["losses"]
    assert result["global_step"] == 25 and len(losses) == 25
    assert losses[0] == pytest.approx(math.log(64), rel=0.02)  # starts at chance over the 64 codes
    assert losses[-1] < 0.4 * losses[0], losses

    scalars, images = read_tensorboard(out / "logs")
    assert any(tag.startswith("validation") for tag in images), images
    for tag in ("loss", "token_accuracy", "token_accuracy_last_scale", "grad_norm", "lr", "tokens_per_second"):
        assert len(scalars[tag]) == 25, tag
    assert scalars["loss"] == pytest.approx(losses)
    assert scalars["token_accuracy"][-1] > scalars["token_accuracy"][0] + 0.3
    assert all(value > 0 for value in scalars["tokens_per_second"])
    assert scalars["lr"][0] == pytest.approx(5e-3)
    assert sorted(p.name for p in (out / "validation" / "step-0000025").iterdir()) == ["00-0.png", "01-square.png"]

    pipe = FlexVARPipeline.from_pretrained(out / "pipeline")
    assert pipe.id2label == {0: "circle", 1: "square", 2: "triangle"}
    card = ModelCard.load(out / "pipeline" / "README.md")
    assert card.data.library_name == "diffusers" and "diffusers-training" in card.data.tags
    image = pipe("triangle", height=64, width=48, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert image.images[0].size == (48, 64)
    saved = load_file(out / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")
    trained = result["transformer"].state_dict()
    assert all(torch.equal(saved[name], trained[name]) for name in saved)  # no EMA: the trained weights


def test_step_metrics_read_the_device_back_only_when_flushed(monkeypatch):
    from flexvar_hf.training.metrics import StepMetrics

    reads = []
    for name in ("item", "tolist", "__float__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, _real=real, _n=name: reads.append(_n) or _real(self))
    metrics = StepMetrics(torch.device("cpu"))
    targets = torch.zeros(2, 10, dtype=torch.long)
    steps = [([2.0, 4.0], [0.5, 0.25], 1.5), ([3.0], [1.0], None)]  # micro-batch losses, accuracies, grad norm
    for step, (step_losses, accuracies, norm) in enumerate(steps, start=1):
        for loss, accuracy in zip(step_losses, accuracies):
            metrics.add_micro_batch(torch.tensor(loss), torch.tensor(accuracy), torch.tensor(accuracy / 2), targets)
        metrics.end_step(step, None if norm is None else torch.tensor(norm), lr=1e-3 * step, num_scales=4 + step)
    assert reads == [] and metrics.num_pending == 2  # nothing read back before the flush
    reductions = []
    logs = metrics.flush(lambda tensor, reduction: reductions.append(reduction) or tensor)
    assert reads == ["tolist", "tolist"] and reductions == ["mean", "sum"]  # one transfer for the window, one count
    assert [step for step, _ in logs] == [1, 2] and metrics.num_pending == 0
    first, second = logs[0][1], logs[1][1]
    assert (first["loss"], first["token_accuracy"], first["token_accuracy_last_scale"]) == (3.0, 0.375, 0.1875)
    assert (first["grad_norm"], first["lr"], first["num_scales"]) == (1.5, 1e-3, 5)
    assert second["loss"] == 3.0 and math.isnan(second["grad_norm"]) and second["num_scales"] == 6
    assert first["tokens_per_second"] == second["tokens_per_second"] > 0  # 60 tokens, 6 images in the window
    assert first["tokens_per_second"] == pytest.approx(10 * first["images_per_second"])
    assert metrics.flush(lambda tensor, reduction: tensor) == []


def test_logging_steps_log_every_step_with_the_same_values(assets, tmp_path, train_script, fresh_accelerate):
    """--logging_steps 3 reads the metrics back in windows; the per-step losses and logs equal --logging_steps 1's."""
    runs = {}
    for window in (1, 3):
        reset_accelerate()
        out = tmp_path / f"w{window}"
        options = ["--max_train_steps", "5", "--logging_steps", str(window), "--seed", "2"]
        arguments = scratch_args(assets, out, *options, "--report_to", "tensorboard")  # the last --report_to wins
        runs[window] = train_script.main(train_script.parse_args(arguments))["losses"]
        scalars, _ = read_tensorboard(out / "logs")
        assert scalars["loss"] == pytest.approx(runs[window]) and len(scalars["grad_norm"]) == 5
    assert runs[3] == runs[1] and len(set(runs[1])) == 5


def copy_killed_before(run: Path, copy: Path, checkpoint: str) -> None:
    """`copy` = the output folder `run` as it was when killed before writing `checkpoint` and the pipeline."""
    shutil.copytree(run, copy)
    shutil.rmtree(copy / checkpoint)
    shutil.rmtree(copy / "pipeline")


def test_resume_reproduces_the_uninterrupted_run(assets, tmp_path, train_script, fresh_accelerate):
    """4 steps straight == 2 steps, a kill, and a resume from checkpoint-2; EMA, accumulation, warmup/decay on.

    10 samples in batches of 2 with 2 batches per step: an epoch is 3 steps (the last of one batch), so the resumed
    run skips 4 batches of epoch 0, does the short step 3 and step 4 in epoch 1.
    """
    options = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--use_ema", "--gradient_accumulation_steps",
               "2", "--train_batch_size", "2", "--lr_scheduler", "linear", "--lr_warmup_steps", "1", "--random_crop",
               "--random_crop_min_fraction", "0.8", "--random_flip", "--max_train_samples", "10", "--seed", "3"]
    straight = train_script.main(train_script.parse_args(scratch_args(assets, tmp_path / "a", *options)))

    # The same command killed after the checkpoint at step 2, then run again with --resume_from_checkpoint latest.
    copy_killed_before(tmp_path / "a", tmp_path / "b", "checkpoint-4")
    (tmp_path / "b" / ".checkpoint-4.tmp").mkdir()  # half-written when killed
    reset_accelerate()
    resumed = train_script.main(
        train_script.parse_args(scratch_args(assets, tmp_path / "b", *options, "--resume_from_checkpoint", "latest"))
    )
    assert resumed["resumed_from"] == str(tmp_path / "b" / "checkpoint-2")
    assert resumed["losses"] == straight["losses"][2:]
    for run in ("a", "b"):
        assert sorted(p.name for p in (tmp_path / run).iterdir() if p.name.startswith("checkpoint")) == [
            "checkpoint-2", "checkpoint-4"]
    files = [Path("pipeline/transformer/diffusion_pytorch_model.safetensors"), Path("checkpoint-4/model.safetensors")]
    for file in files:
        first, second = load_file(tmp_path / "a" / file), load_file(tmp_path / "b" / file)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[name], second[name]) for name in first), file
    raw = resumed["transformer"].state_dict()
    assert all(torch.equal(raw[name], straight["transformer"].state_dict()[name]) for name in raw)

    # EMA: the pipeline holds the EMA weights, which differ from the raw trained weights.
    saved = load_file(tmp_path / "b" / files[0])
    names = [name for name, _ in resumed["transformer"].named_parameters()]
    ema = dict(zip(names, resumed["ema_model"].shadow_params))
    assert all(torch.equal(saved[name], ema[name]) for name in names)
    assert any(not torch.equal(saved[name], raw[name]) for name in names)


def test_expandable_segments_unless_the_allocator_is_configured(train_script, monkeypatch):
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    train_script.use_expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
        monkeypatch.setenv(name, "max_split_size_mb:64")
        train_script.use_expandable_segments()
        assert os.environ[name] == "max_split_size_mb:64" and os.environ.get("PYTORCH_CUDA_ALLOC_CONF") in (
            None, "max_split_size_mb:64")
        monkeypatch.delenv(name)


def test_torch_compile_trains_like_eager(assets, tmp_path, train_script, fresh_accelerate, monkeypatch):
    from flexvar_hf.utils.inductor import wide_row_inductor

    options = ["--max_train_steps", "3", "--max_train_samples", "8", "--seed", "5", "--random_flip"]
    eager = train_script.main(train_script.parse_args(scratch_args(assets, tmp_path / "eager", *options)))
    reset_accelerate()
    compile_calls = []
    compile_blocks = FlexVARTransformer2DModel.compile_repeated_blocks

    def spy(self, **kwargs):
        compile_calls.append(kwargs)
        return compile_blocks(self, **kwargs)

    monkeypatch.setattr(FlexVARTransformer2DModel, "compile_repeated_blocks", spy)
    compiled = train_script.main(
        train_script.parse_args(scratch_args(assets, tmp_path / "compiled", *options, "--torch_compile"))
    )
    assert compile_calls == [{"dynamic": True, "backend": wide_row_inductor}]  # LayerNorms of d24 rows in one pass
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-4)
    assert compiled["losses"][0] != compiled["losses"][-1]  # it trained
    first = load_file(tmp_path / "eager" / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")
    second = load_file(tmp_path / "compiled" / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert first.keys() == second.keys()  # compiled blocks save under the plain names
    assert all(torch.allclose(first[name], second[name], atol=1e-5) for name in first)


def test_bf16_weights_train_like_the_fused_adamw_resume_and_save_float32(
    assets, tmp_path, train_script, fresh_accelerate
):
    """`--bf16_weights` against `--fused_adamw` under bf16 autocast: the same first loss (the same bfloat16
    weights) and the others to bfloat16 rounding; validation images from the float32 weights; the saved pipeline and
    the returned model in float32 with the masters' values (the EMA's in the pipeline), which a resumed run
    reproduces exactly from the checkpoint's bfloat16 weights and float32 masters."""
    options = ["--mixed_precision", "bf16", "--max_train_steps", "4", "--checkpointing_steps", "2", "--use_ema",
               "--max_train_samples", "8", "--seed", "5", "--validation_steps", "4", "--validation_class_labels", "0",
               "--validation_num_inference_steps", "2"]
    fused = train_script.main(train_script.parse_args(scratch_args(assets, tmp_path / "fused", *options,
                                                                   "--fused_adamw")))
    reset_accelerate()
    bf16 = train_script.main(train_script.parse_args(scratch_args(assets, tmp_path / "a", *options, "--bf16_weights")))
    assert bf16["losses"][0] == fused["losses"][0]
    assert bf16["losses"] == pytest.approx(fused["losses"], rel=1e-3) and len(set(bf16["losses"])) == 4
    assert (tmp_path / "a" / "validation" / "step-0000004" / "00-0.png").is_file()
    weights = bf16["transformer"].state_dict()
    assert all(tensor.dtype == torch.float32 for tensor in weights.values())
    for name, tensor in fused["transformer"].state_dict().items():
        assert relative_error(weights[name], tensor) < 0.02, name
    file = Path("pipeline/transformer/diffusion_pytorch_model.safetensors")
    saved = load_file(tmp_path / "a" / file)
    names = [name for name, _ in bf16["transformer"].named_parameters()]
    assert all(torch.equal(saved[name], ema) for name, ema in zip(names, bf16["ema_model"].shadow_params))
    checkpoint = load_file(tmp_path / "a" / "checkpoint-2" / "model.safetensors")
    assert checkpoint["blocks.0.attn.to_qkv.weight"].dtype == torch.bfloat16

    copy_killed_before(tmp_path / "a", tmp_path / "b", "checkpoint-4")
    reset_accelerate()
    resumed = train_script.main(train_script.parse_args(
        scratch_args(assets, tmp_path / "b", *options, "--bf16_weights", "--resume_from_checkpoint", "latest")
    ))
    assert resumed["losses"] == bf16["losses"][2:]
    assert all(torch.equal(tensor, weights[name]) for name, tensor in resumed["transformer"].state_dict().items())
    resumed_saved = load_file(tmp_path / "b" / file)
    assert resumed_saved.keys() == saved.keys()
    assert all(torch.equal(resumed_saved[name], saved[name]) for name in saved)

    # A checkpoint of float32 weights has no masters: resuming it with --bf16_weights would lose them.
    reset_accelerate()
    with pytest.raises(ValueError, match="no float32 master"):
        train_script.main(train_script.parse_args(scratch_args(
            assets, tmp_path / "fused", *options, "--bf16_weights", "--max_train_steps", "6",
            "--resume_from_checkpoint", str(tmp_path / "fused" / "checkpoint-4"),
        )))


def test_scale_weight_power_and_input_token_noise_reach_the_loss(assets, tmp_path, train_script, fresh_accelerate):
    def first_loss(*extra):
        reset_accelerate()
        arguments = scratch_args(assets, tmp_path / str(len(extra)), "--max_train_steps", "1", "--seed", "3", *extra)
        return train_script.main(train_script.parse_args(arguments))["losses"][0]

    # The same initialisation, batch and scales, so equal settings give equal losses; only the weighting differs
    # (slightly: at initialisation every token's loss is near log(vocabulary size)).
    unweighted = first_loss()
    assert first_loss("--scale_weight_power", "0") == unweighted
    assert first_loss("--scale_weight_power", "1") != unweighted
    assert first_loss("--input_token_noise", "0.5") != unweighted


def test_fine_tune_a_pipeline_and_transformer_config(assets, tmp_path, train_script, fresh_accelerate):
    result = train_script.main(
        train_script.parse_args([
            "--pretrained_model_name_or_path", str(assets["pipe"]), "--train_data_dir", str(assets["data"]),
            "--resolution", "32x64", "--train_batch_size", "4", "--max_train_steps", "2", "--report_to", "none",
            "--output_dir", str(tmp_path / "ft"), "--mixed_precision", "bf16", "--scale_lr",
            "--learning_rate", "2.56e-2", "--gradient_checkpointing",
        ])
    )
    assert result["global_step"] == 2
    pipe = FlexVARPipeline.from_pretrained(tmp_path / "ft" / "pipeline")
    original = FlexVARPipeline.from_pretrained(assets["pipe"])
    assert pipe.id2label == {0: "circle", 1: "square", 2: "triangle"}  # the data's class names win
    # The same architecture; the default image size follows the training resolution's longer side (64 pixels).
    sample_size = pipe.transformer.config.sample_size
    assert sample_size == 64 // pipe.vae_scale_factor != original.transformer.config.sample_size
    ignored = {"_name_or_path": "", "sample_size": 0}
    assert {**pipe.transformer.config, **ignored} == {**original.transformer.config, **ignored}
    assert pipe.transformer.dtype == torch.float32
    for name, tensor in original.vqvae.state_dict().items():  # saved as loaded, not in the bf16 used for training
        assert torch.equal(pipe.vqvae.state_dict()[name], tensor)
    changed = [name for name, tensor in original.transformer.state_dict().items()
               if not torch.equal(pipe.transformer.state_dict()[name], tensor)]
    assert changed
    assert "learning rate 0.0004" in (tmp_path / "ft" / "pipeline" / "README.md").read_text()  # 2.56e-2 * 4 / 256

    reset_accelerate()
    result = train_script.main(
        train_script.parse_args([
            "--vqvae_model_name_or_path", str(assets["pipe"]), "--vqvae_subfolder", "vqvae", "--transformer_config",
            str(assets["config"]), "--num_classes", "5", "--train_data_dir", str(assets["data"]), "--resolution",
            "64", "--max_train_steps", "50", "--max_train_minutes", "1e-9", "--use_ema", "--report_to", "none",
            "--output_dir", str(tmp_path / "cfg"),
        ])
    )
    # Out of time after the first step: it checkpoints and saves the pipeline instead of going on to step 50.
    assert result["global_step"] == 1 and len(result["losses"]) == 1
    assert [p.name for p in (tmp_path / "cfg").glob("checkpoint-*")] == ["checkpoint-1"]
    config = FlexVARTransformer2DModel.load_config(tmp_path / "cfg" / "pipeline" / "transformer")
    assert (config["num_classes"], config["hidden_size"], config["vocab_size"], config["code_dim"]) == (5, 32, 64, 8)
    factor = FlexVARPipeline.from_pretrained(tmp_path / "cfg" / "pipeline").vae_scale_factor
    # The pipeline's default size is the training size (not the default of 16 tokens), also for the saved EMA copy.
    assert config["sample_size"] == 64 // factor != 16


def test_grow_num_layers_deepens_the_pretrained_transformer_and_resumes(assets, tmp_path, train_script):
    original = FlexVARPipeline.from_pretrained(assets["pipe"]).transformer
    depth = original.config.num_layers
    out = tmp_path / "grow"

    def run(*extra):
        reset_accelerate()
        return train_script.main(train_script.parse_args([
            "--pretrained_model_name_or_path", str(assets["pipe"]), "--grow_num_layers", str(depth + 2),
            "--train_data_dir", str(assets["data"]), "--resolution", "64", "--train_batch_size", "4",
            "--max_train_steps", "2", "--report_to", "none", "--output_dir", str(out), "--use_ema", *extra,
        ]))

    # Out of time after the first step: a checkpoint of the grown model, which the next run resumes.
    assert run("--max_train_minutes", "1e-9")["global_step"] == 1
    assert run("--resume_from_checkpoint", "latest")["global_step"] == 2
    grown = FlexVARPipeline.from_pretrained(out / "pipeline").transformer
    assert grown.config.num_layers == depth + 2 and len(grown.blocks) == depth + 2
    assert grown.config.sample_size == 64 // FlexVARPipeline.from_pretrained(out / "pipeline").vae_scale_factor
    ignored = {"_name_or_path": "", "num_layers": 0, "sample_size": 0}
    assert {**grown.config, **ignored} == {**original.config, **ignored}

    reset_accelerate()
    with pytest.raises(ValueError, match="more than the model's"):
        train_script.main(train_script.parse_args([
            "--pretrained_model_name_or_path", str(assets["pipe"]), "--grow_num_layers", str(depth),
            "--train_data_dir", str(assets["data"]), "--resolution", "64", "--output_dir", str(tmp_path / "same"),
        ]))
    reset_accelerate()


def test_bad_input_is_rejected_before_training(assets, tmp_path, train_script, fresh_accelerate):
    def fails(match: str, arguments: list[str]) -> None:
        reset_accelerate()
        with pytest.raises(ValueError, match=match):
            train_script.main(train_script.parse_args(arguments))

    out = tmp_path / "bad"
    base = scratch_args(assets, out, "--max_train_steps", "1")
    fails("is not an existing folder", [*base, "--train_data_dir", str(tmp_path / "nowhere")])
    fails("--grow_num_layers deepens a pretrained transformer", [*base, "--grow_num_layers", "2"])
    fails("--label_column 'class' is not a column", [*base, "--label_column", "class"])
    fails(r"labels outside the model's 2 classes \[0, 2\): \[2\]", [*base, "--num_classes", "2"])
    fails("multiples of 16", [*base, "--resolution", "72"])
    fails("--max_train_minutes must be positive", [*base, "--max_train_minutes", "0"])
    fails("--scale_weight_power must be >= 0", [*base, "--scale_weight_power", "-1"])
    fails(r"--input_token_noise must be in \[0, 1\)", [*base, "--input_token_noise", "1"])
    fails("use --train_batch_size >= 2", [*base, "--input_token_noise", "0.2", "--train_batch_size", "1"])
    fails("Checkpoint to resume from 'checkpoint-5' does not exist",
          [*base, "--resume_from_checkpoint", "checkpoint-5"])
    fails("exactly one of --pretrained_model_name_or_path",
          [*base, "--pretrained_model_name_or_path", str(assets["pipe"])])
    fails("exactly one of --pretrained_model_name_or_path", base[2:])
    fails("exactly one of --depth and --transformer_config", [*base, "--transformer_config", str(assets["config"])])
    fails("is not an existing folder", [*base[2:], "--vqvae_model_name_or_path", str(tmp_path / "no-vq")])
    fails("--validation_steps needs --validation_class_labels", [*base, "--validation_steps", "1"])
    fails("neither a class id nor a known class name", [*base, "--validation_steps", "1",
                                                        "--validation_class_labels", "hexagon"])
    fails("fine-tuning cannot change the number of classes",
          ["--pretrained_model_name_or_path", str(assets["pipe"]), *base[4:], "--num_classes", "7"])
    fails("--bf16_weights needs bf16 mixed precision", [*base, "--bf16_weights"])
    fails("--bf16_weights needs --gradient_accumulation_steps 1",
          [*base, "--mixed_precision", "bf16", "--bf16_weights", "--gradient_accumulation_steps", "2"])
    fails("replaces --fused_adamw", [*base, "--mixed_precision", "bf16", "--bf16_weights", "--fused_adamw"])
    # Nothing was trained or saved for any of them.
    assert not (out / "pipeline").exists() and not list(out.glob("*checkpoint-*"))


def test_bad_data_and_output_folders_stop_the_run_before_training(assets, tmp_path, train_script, fresh_accelerate):
    def fails(match: str, out: Path, *extra: str) -> None:
        reset_accelerate()
        with pytest.raises(ValueError, match=match):
            train_script.main(train_script.parse_args(scratch_args(assets, out, "--max_train_steps", "1", *extra)))
        assert not list(out.glob("checkpoint-*")) and not (out / "pipeline" / "model_index.json").exists()

    one_class = tmp_path / "one"
    shutil.copytree(assets["data"] / "circle", one_class / "circle")
    fails(r"only one class sub-folder \('circle'\)", tmp_path / "a", "--train_data_dir", str(one_class))
    broken = broken_image_folder(assets, tmp_path)
    fails(r"2 of the 14 images cannot be read.*--image_check skip", tmp_path / "b", "--train_data_dir", str(broken))

    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    fails("--output_dir .*notes.txt' is a file", a_file)
    assert a_file.read_text() == "mine"
    # The run ends by replacing OUTPUT_DIR/pipeline: a folder there that is not a pipeline of ours stays untouched.
    user_folder = tmp_path / "c" / "pipeline"
    user_folder.mkdir(parents=True)
    (user_folder / "thesis.tex").write_text("mine")
    fails("not a diffusers folder written by flexvar-hf", tmp_path / "c")
    assert (user_folder / "thesis.tex").read_text() == "mine"

    reset_accelerate()  # skipping the unreadable images trains on the other 12
    result = train_script.main(train_script.parse_args(scratch_args(
        assets, tmp_path / "d", "--max_train_steps", "1", "--train_data_dir", str(broken), "--image_check", "skip")))
    assert result["global_step"] == 1 and (tmp_path / "d" / "pipeline" / "model_index.json").is_file()
    check_output_path(tmp_path / "d" / "pipeline", overwrite=True)  # a folder of ours: a later run may replace it


def test_max_grad_norm_clips_the_gradients_the_optimizer_sees(assets, tmp_path, train_script, fresh_accelerate):
    """Every optimizer step (a global pre-hook, whatever optimizer or clipping code runs) sees gradients of total norm
    --max_grad_norm where the raw gradients are larger, and the raw ones with --max_grad_norm 0. With --fused_adamw
    the raw gradients reach the step with the factor its kernel divides them by (`grad_scale`, the folded clip), and
    the run trains like the unfused one."""
    norms, folded_steps = [], []

    def record(optimizer, args, kwargs):
        grads = [p.grad.flatten() for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        scale = getattr(optimizer, "grad_scale", None)
        folded_steps.append(scale is not None)
        norms.append(torch.linalg.vector_norm(torch.cat(grads)).item() / (1.0 if scale is None else scale.item()))

    def run(name: str, max_grad_norm: str, *extra: str) -> list[float]:
        reset_accelerate()
        norms.clear()
        arguments = scratch_args(
            assets, tmp_path / name, "--max_train_steps", "2", "--max_grad_norm", max_grad_norm, *extra
        )
        losses = train_script.main(train_script.parse_args(arguments))["losses"]
        return list(norms), losses

    handle = register_optimizer_step_pre_hook(record)
    try:
        raw, raw_losses = run("off", "0")
        clipped, clipped_losses = run("on", "0.05")
        folded_steps.clear()
        folded, folded_losses = run("fused", "0.05", "--fused_adamw")
    finally:
        handle.remove()
    assert folded_steps == [True, True]
    assert len(raw) == len(clipped) == 2 and min(raw) > 0.2, raw  # the raw gradients are larger than the bound
    assert clipped == pytest.approx([0.05, 0.05], rel=1e-4)
    assert clipped_losses[0] == raw_losses[0]  # the same first batch and weights; only the update differed
    assert folded == pytest.approx([0.05, 0.05], rel=1e-4)
    assert folded_losses == pytest.approx(clipped_losses, rel=1e-5) and folded_losses[1] != raw_losses[1]


def test_label_smoothing_reaches_the_loss(assets, tmp_path, train_script, fresh_accelerate):
    """The smoothed cross-entropy is `(1 - eps) * CE + eps * mean over the vocabulary of -log p`: for the same first
    batch and weights the first loss moves linearly with --label_smoothing, by `eps * (that mean - CE)`."""

    def first_loss(smoothing: str) -> float:
        reset_accelerate()
        arguments = scratch_args(assets, tmp_path / smoothing, "--max_train_steps", "1")
        return train_script.main(train_script.parse_args([*arguments, "--label_smoothing", smoothing]))["losses"][0]

    plain, tenth, fifth = first_loss("0"), first_loss("0.1"), first_loss("0.2")
    assert abs(tenth - plain) > 1e-4
    assert fifth - plain == pytest.approx(2 * (tenth - plain), rel=1e-2)


@pytest.mark.parametrize("precision", ["float32", "bf16_weights"])
def test_two_processes_agree(assets, tmp_path, train_script, fresh_accelerate, precision):
    """`examples/train.py` under torchrun with 2 CPU processes of 2 images each: both end with the same weights, and
    with those of one process trained on the same global batches of 4 (so the batches are sharded, not repeated, and
    the losses and gradients averaged over processes as over one batch). Class-label dropout is off: its draws
    depend on the process. When the process group is destroyed no DDP wrapper is alive any more (one alive would
    free the group later with the GIL held, which can deadlock Gloo's worker threads: `training.distributed
    .end_training`). `bf16_weights`: bf16 autocast with `--bf16_weights`, the bfloat16 gradients averaged in
    float32 (`float32_mean_allreduce_hook`) and rounded once, so one process agrees to bfloat16 rounding; the
    returned weights are the float32 masters."""
    extra = [] if precision == "float32" else ["--mixed_precision", "bf16", "--bf16_weights"]
    loss_tolerance = 1e-3 if extra else 1e-5
    wrapper = tmp_path / "run_and_dump.py"
    wrapper.write_text(
        "import faulthandler, gc, importlib.util, sys, torch\n"
        # A process still running after 200 s prints every thread's stack and exits, so that a hang fails below
        # with the stacks instead of at the 240 s timeout without them.
        "faulthandler.dump_traceback_later(200, exit=True)\n"
        "alive_at_destroy, destroy = [], torch.distributed.destroy_process_group\n"
        "def counting_destroy(*args, **kwargs):\n"
        "    gc.collect()\n"
        "    alive_at_destroy.append(sum(isinstance(o, torch.nn.parallel.DistributedDataParallel)"
        " for o in gc.get_objects()))\n"
        "    destroy(*args, **kwargs)\n"
        "torch.distributed.destroy_process_group = counting_destroy\n"
        f"spec = importlib.util.spec_from_file_location('train', {str(REPO_ROOT / 'examples' / 'train.py')!r})\n"
        "train = importlib.util.module_from_spec(spec); spec.loader.exec_module(train)\n"
        "result = train.main(train.parse_args(sys.argv[2:]))\n"
        "rank = __import__('os').environ['RANK']\n"
        "torch.save({'state': result['transformer'].state_dict(), 'losses': result['losses'],"
        " 'alive_at_destroy': alive_at_destroy}, f'{sys.argv[1]}/rank{rank}.pt')\n"
    )
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(wrapper), str(tmp_path),
        *scratch_args(assets, tmp_path / "ddp", "--max_train_steps", "3", "--train_batch_size", "2",
                      "--checkpointing_steps", "2", "--use_ema", "--class_dropout_prob", "0", *extra),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    hang = completed.stderr.find("Timeout (")  # faulthandler's stacks of a hung process, if any
    assert completed.returncode == 0, completed.stderr[hang:hang + 8000] if hang >= 0 else completed.stderr[-3000:]
    assert "DistributedType.MULTI_CPU" in completed.stderr
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert [rank["alive_at_destroy"] for rank in ranks] == [[0], [0]]
    assert ranks[0]["losses"] == ranks[1]["losses"] and len(ranks[0]["losses"]) == 3
    assert all(torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]) for name in ranks[0]["state"])
    single = train_script.main(train_script.parse_args(scratch_args(
        assets, tmp_path / "single", "--max_train_steps", "3", "--train_batch_size", "4", "--use_ema",
        "--class_dropout_prob", "0", *extra)))
    assert ranks[0]["losses"] == pytest.approx(single["losses"], rel=loss_tolerance)
    assert len(set(single["losses"])) == 3  # three different batches
    for name, tensor in single["transformer"].state_dict().items():
        assert tensor.dtype == ranks[0]["state"][name].dtype == torch.float32
        if extra:  # tensors that start at zero are their updates: 1% of them is 0.1 of a step's size at most
            assert relative_error(ranks[0]["state"][name], tensor) < 0.02, name
        else:
            torch.testing.assert_close(ranks[0]["state"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoint-2").iterdir()) == [
        "custom_checkpoint_0.pkl", "model.safetensors", "optimizer.bin", "random_states_0.pkl",
        "random_states_1.pkl", "scheduler.bin", "training_state.json"]
    pipe = FlexVARPipeline.from_pretrained(tmp_path / "ddp" / "pipeline")
    assert pipe.transformer.config.num_classes == 3
