"""ImageNet-1k class names shipped with the package (see data/README.md for their source)."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in class-id order, e.g. index 0 is "tench, Tinca tinca"."""
    text = resources.files("flexvar_hf").joinpath("data/imagenet_classes.json").read_text(encoding="utf-8")
    return tuple(json.loads(text))


def imagenet_id2label() -> dict[int, str]:
    """Class id -> name mapping for a 1000-class pipeline."""
    return dict(enumerate(imagenet_class_names()))
