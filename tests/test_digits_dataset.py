"""`examples/make_digits_dataset.py`: layout, determinism, and that `datasets`' imagefolder reads it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import load_example

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits():
    return load_example("make_digits_dataset")


def file_hashes(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*.png"))}


def make(digits, folder: Path, *extra: str) -> Path:
    args = ["--output_dir", str(folder), "--resolution", "32", "--train_per_class", "2", "--test_per_class", "1",
            "--num_workers", "1", *extra]
    assert digits.main(args) == 0
    return folder


def test_layout_and_imagefolder(digits, tmp_path):
    import datasets

    root = make(digits, tmp_path / "digits")
    for split, per_class in (("train", 2), ("test", 1)):
        for digit in range(10):
            files = sorted((root / split / str(digit)).glob("*.png"))
            assert len(files) == per_class
            with Image.open(files[0]) as image:
                assert image.size == (32, 32) and image.mode == "RGB"
    config = json.loads((root / "digits_config.json").read_text())
    assert config["resolution"] == 32 and config["seed"] == 0 and len(config["classes"]) == 10

    loaded = datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=str(tmp_path / "cache"))
    assert set(loaded) == {"train", "test"}
    assert loaded["train"].features["label"].names == [str(d) for d in range(10)]
    assert sorted(loaded["train"]["label"]) == sorted(list(range(10)) * 2)


def test_deterministic_by_seed_and_independent_of_workers(digits, tmp_path):
    first = file_hashes(make(digits, tmp_path / "a"))
    assert first == file_hashes(make(digits, tmp_path / "b", "--num_workers", "2"))
    other = file_hashes(make(digits, tmp_path / "c", "--seed", "1"))
    assert other.keys() == first.keys() and all(other[name] != first[name] for name in first)


def test_images_vary_and_refuses_to_overwrite(digits, tmp_path):
    root = make(digits, tmp_path / "d")
    arrays = [np.asarray(Image.open(path), dtype=np.float32) for path in sorted(root.rglob("*.png"))]
    assert all(array.std() > 5 for array in arrays)  # a digit on a background, not a blank image
    assert np.std([array.mean(axis=(0, 1)) for array in arrays], axis=0).min() > 5  # colours vary
    with pytest.raises(SystemExit, match="exists"):
        make(digits, root)
