"""A stand-in for the few parts of Hugging Face `datasets` that `examples/train.py` uses on an image folder, for
`bench_train.py --e2e` on a machine without `datasets` (and its pyarrow, too large to carry there). Put its folder on
PYTHONPATH only where `import datasets` fails. Rows hold the image opened lazily with PIL (decoded on first use, as
`datasets`' Image feature does) and the class id of its sub-folder (sorted names, as the imagefolder builder)."""

from __future__ import annotations

import hashlib
import random
import types
from pathlib import Path

from PIL import Image as PILImage

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
exceptions = types.SimpleNamespace(DataFilesNotFoundError=FileNotFoundError)
utils = types.SimpleNamespace(
    logging=types.SimpleNamespace(set_verbosity_warning=lambda: None, set_verbosity_error=lambda: None)
)


class Value:
    def __init__(self, dtype: str):
        self.dtype = dtype


class ClassLabel:
    def __init__(self, names: list[str]):
        self.names = list(names)
        self.num_classes = len(self.names)


class Image:
    """The image feature type (this stand-in's image columns hold paths, so decoding is never switched)."""

    def __init__(self, decode: bool = True):
        self.decode = decode


class DatasetDict(dict):
    pass


class Dataset:
    def __init__(self, rows: list[dict], features: dict, fingerprint: str):
        self.rows, self.features, self._fingerprint = rows, features, fingerprint

    @property
    def column_names(self) -> list[str]:
        return list(self.features)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        if isinstance(key, str):
            return [row[key] for row in self.rows]
        row = dict(self.rows[key])
        row["image"] = PILImage.open(row["image"])
        return row

    def select_columns(self, columns: list[str]) -> Dataset:
        return Dataset([{c: row[c] for c in columns} for row in self.rows], {c: self.features[c] for c in columns},
                       self._fingerprint + "".join(columns))

    def select(self, indices) -> Dataset:
        return Dataset([self.rows[i] for i in indices], self.features, f"{self._fingerprint}-{list(indices)[:8]}")

    def shuffle(self, seed=None) -> Dataset:
        order = list(range(len(self.rows)))
        random.Random(seed).shuffle(order)
        return self.select(order)

    def map(self, function, batched: bool = False, num_proc=None, remove_columns=(), desc=None) -> Dataset:
        """`function` over all rows at once (as one batch of undecoded columns); its columns replace the removed."""
        if not batched:
            raise NotImplementedError("This stand-in maps batches only.")
        kept = [c for c in self.features if c not in set(remove_columns)]
        new = function({column: [row[column] for row in self.rows] for column in self.features})
        rows = [{**{c: row[c] for c in kept}, **{c: values[i] for c, values in new.items()}}
                for i, row in enumerate(self.rows)]
        return Dataset(rows, {**{c: self.features[c] for c in kept}, **{c: Value("string") for c in new}},
                       self._fingerprint + "-map")

    def unique(self, column: str) -> list:
        return sorted({row[column] for row in self.rows})


def load_dataset(builder: str, data_dir: str | None = None, cache_dir: str | None = None, **_) -> DatasetDict:
    if builder != "imagefolder":
        raise NotImplementedError("This stand-in only loads image folders.")
    folders = sorted(path for path in Path(data_dir).iterdir() if path.is_dir())
    rows = [
        {"image": str(file), "label": label}
        for label, folder in enumerate(folders)
        for file in sorted(folder.iterdir())
        if file.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not rows:
        raise FileNotFoundError(f"No images in {data_dir}.")
    fingerprint = hashlib.sha256("\n".join(row["image"] for row in rows).encode()).hexdigest()[:16]
    features = {"image": Value("string"), "label": ClassLabel([folder.name for folder in folders])}
    return DatasetDict(train=Dataset(rows, features, fingerprint))
