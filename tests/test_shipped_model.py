"""The shipped digits models: `python examples/generate.py` with no arguments, the classifier, the tokenizer and the
transformer's samples as the classifier reads them."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flexvar_hf import FlexVARPipeline

from conftest import load_example

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = REPO_ROOT / "models" / "flexvar-digits"
CLASSIFIER = REPO_ROOT / "models" / "digits-classifier"
# The default grid: rows of 10 x 96, 10 x 96, 10 x 128 and 10 x 192-wide (96 tall) images with 4-pixel gaps, after a
# 112-pixel caption column.
GRID_SIZE = (112 + 4 + 10 * 192 + 11 * 4, 96 + 96 + 128 + 96 + 5 * 4)


@pytest.fixture(scope="module")
def classifier_module():
    return load_example("train_classifier")


@pytest.fixture(scope="module")
def classifier(classifier_module):
    return classifier_module.load_classifier(CLASSIFIER)


@pytest.fixture(scope="module")
def digit_images():
    """Two fresh renders of every digit (not from the training set: another seed), labels."""
    digits = load_example("make_digits_dataset")
    fonts = digits.font_files()
    images, labels = [], []
    for index in range(20):
        rng = np.random.default_rng([12345, index])
        images.append(digits.render_image(index % 10, rng, 96, fonts))
        labels.append(index % 10)
    return images, torch.tensor(labels)


@pytest.fixture(scope="module")
def pipe():
    pipe = FlexVARPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_generate_without_arguments_writes_the_grid(tmp_path):
    output = tmp_path / "grid.png"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "generate.py"), "--output", str(output), "--device", "cpu"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Wrote {output.resolve()}" in result.stdout
    with Image.open(output) as grid:
        assert grid.size == GRID_SIZE and grid.mode == "RGB"
        # Not a blank canvas: the generated cells vary.
        assert np.asarray(grid.crop((120, 4, 120 + 64, 68)), dtype=np.float32).std() > 5


def test_shipped_pipeline_layout(pipe):
    assert pipe.vqvae.downsample_factor == 8 == pipe.scheduler.config.vae_scale_factor
    assert pipe.transformer.config.num_classes == 10
    assert pipe.get_label_ids(["seven", "7"]) == [7, 7]
    size = sum(path.stat().st_size for path in MODEL.rglob("*") if path.is_file())
    assert size < 60 * 2**20


def test_classifier_reads_fresh_digits(classifier, classifier_module, digit_images):
    images, labels = digit_images
    predictions, features = classifier_module.classify(classifier, images)
    assert (predictions == labels).float().mean() >= 0.9
    assert features.shape == (20, classifier.feature_dim)


def test_tokenizer_reconstructions_keep_the_digit(pipe, classifier, classifier_module, digit_images):
    images, labels = digit_images
    pixels = classifier_module.prepare_images(images, size=96)
    with torch.no_grad():
        decoded = pipe.vqvae(pixels).sample.clamp(-1, 1)
    predictions, _ = classifier_module.classify(classifier, (decoded + 1) / 2)
    assert (predictions == labels).float().mean() >= 0.9


def test_samples_show_the_requested_digit(pipe, classifier, classifier_module):
    """The model's setting (96x96 and constant guidance 3.5, the pipeline's defaults for it from its configs, and
    10 steps): the evaluations measured about 97% class accuracy over 4,000 images; 20 images on the CPU must keep
    at least 17 digits (chance: 10%; this seed gives 18)."""
    assert pipe.scheduler.config.guidance_schedule == "constant" and pipe.default_sample_size == 96
    labels = list(range(10)) * 2
    generator = torch.Generator().manual_seed(0)
    images = pipe(labels, num_inference_steps=10, generator=generator, output_type="pt").images
    assert images.shape == (20, 3, 96, 96)
    predictions, _ = classifier_module.classify(classifier, images)
    assert (predictions == torch.tensor(labels)).float().mean() >= 0.85


def test_edit_example_writes_its_pictures(tmp_path):
    """`examples/edit.py` (the README's editing pictures) end to end on the shipped model, small and quick."""
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "edit.py"), "--output_dir", str(tmp_path), "--size", "48",
         "--steps", "4", "--strengths", "0", "1", "--device", "cpu"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"to {tmp_path.resolve()}" in result.stdout
    with Image.open(tmp_path / "source.png") as source:
        assert source.size == (48, 48)
    for name in ("img2img.png", "inpaint.png", "outpaint.png"):
        with Image.open(tmp_path / name) as sheet:
            assert sheet.width > 2 * 48 and np.asarray(sheet, dtype=np.float32).std() > 5


def test_frechet_distance_numbers():
    evaluate = load_example("evaluate")
    features = torch.randn(2000, 4, generator=torch.Generator().manual_seed(0))
    assert evaluate.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    # A shift of 2 in each of 4 dimensions: |mu_a - mu_b|^2 = 16, equal covariances add nothing.
    assert evaluate.frechet_distance(features, features + 2) == pytest.approx(16.0, rel=1e-6)
    # Doubling the spread of N(0, I): tr(S_a + S_b - 2 (S_a S_b)^1/2) = 4 * (1 + 4 - 4) = 4.
    assert evaluate.frechet_distance(features, 2 * features) == pytest.approx(4.0, rel=0.05)


def test_per_class_accuracy_and_weakest_classes():
    evaluate = load_example("evaluate")
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    predictions = torch.tensor([0, 1, 0, 0, 1, 1, 0, 1])
    per_class = evaluate.per_class_accuracy(predictions, labels, 4)
    assert per_class[:3] == [0.75, 1.0, 0.0] and math.isnan(per_class[3])  # class 3 has no images
    result = evaluate.Result("generate", "96x96", "10", "3.5", 0.625, 1.0, 8, 0.1, per_class[:3])
    assert evaluate.weakest_classes(result) == "2: 0.0%, 0: 75.0%"


def test_evaluate_refuses_outputs_that_would_overwrite_each_other(capsys):
    evaluate = load_example("evaluate")
    for outputs in (["--output", "eval.json"], ["--output", "eval.md", "--samples", "eval.md"]):
        with pytest.raises(SystemExit):
            evaluate.parse_args(["--data_dir", "digits", *outputs])
        assert "must be different files" in capsys.readouterr().err
    assert evaluate.parse_args(["--data_dir", "digits", "--output", "eval.md", "--samples", "eval.png"])


def test_evaluate_scores_the_shipped_model(tmp_path):
    """`examples/evaluate.py` end to end on a few fresh held-out digits: every row of the table, the sampling
    options in the output, and accuracies that say the model draws digits (its evaluations: about 93%)."""
    data = tmp_path / "digits96"
    digits = load_example("make_digits_dataset")
    assert digits.main(["--output_dir", str(data), "--resolution", "96", "--train_per_class", "1",
                        "--test_per_class", "4", "--num_workers", "1", "--seed", "7"]) == 0
    output = tmp_path / "eval.md"
    evaluate = load_example("evaluate")
    assert evaluate.main([
        "--data_dir", str(data), "--resolution", "96", "--steps", "3", "10", "--zero_shot_sizes", "64x128",
        "--num_per_class", "2", "--batch_size", "20", "--guidance_schedule", "constant", "--top_k", "200",
        "--device", "cpu", "--output", str(output), "--samples", str(tmp_path / "samples.png"),
    ]) == 0
    results = json.loads(output.with_suffix(".json").read_text())["results"]
    assert [(r["setting"], r["size"], r["steps"], r["guidance"], r["images"]) for r in results] == [
        ("real held-out images", "96x96", "-", "-", 40),
        ("VQ reconstruction", "96x96", "-", "-", 20),
        ("generate", "96x96", "3", "3.5 (constant)", 20),
        ("generate", "96x96", "10", "3.5 (constant)", 20),
        ("generate, no guidance", "96x96", "10", "1", 20),
        ("in-paint right half", "96x96", "10", "3.5 (constant)", 20),
        ("zero-shot size", "64x128", "10", "3.5 (constant)", 20),
    ]
    accuracy = {(r["setting"], r["steps"]): r["accuracy"] for r in results}
    assert accuracy[("real held-out images", "-")] >= 0.9 and accuracy[("VQ reconstruction", "-")] >= 0.8
    assert accuracy[("generate", "10")] >= 0.7
    assert all(r["fd"] >= 0 for r in results)
    for r in results:  # the same number of images per class, so the per-class accuracies average to the overall one
        assert len(r["per_class_accuracy"]) == 10
        assert sum(r["per_class_accuracy"]) / 10 == pytest.approx(r["accuracy"], abs=1e-6)
    assert "top-k 200" in output.read_text()
    with Image.open(tmp_path / "samples.png") as sheet:
        assert sheet.height > 7 * 64  # one row of samples per setting
