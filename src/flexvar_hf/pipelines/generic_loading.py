"""How a saved FlexVAR pipeline folder names its class, so that diffusers' generic `DiffusionPipeline.from_pretrained`
loads it too.

diffusers resolves a plain `_class_name` in `model_index.json` as an attribute of the `diffusers` package, which has
no FlexVAR classes. For pipelines defined elsewhere it reads the list form `[module, class name]`: `module.py` is a
file of the folder (or hub repository) that diffusers imports as remote code, after `trust_remote_code=True`. A
saved folder therefore holds `flexvar_pipeline.py`, whose only statement imports the class from the installed
flexvar-hf package, and names it in `model_index.json`. flexvar-hf's own classes read the list form back as the
plain name (`plain_class_name`), so they load such folders without remote code, as well as folders saved before.
"""

from __future__ import annotations

import os
from pathlib import Path

PIPELINE_MODULE = "flexvar_pipeline"

_MODULE_SOURCE = '''"""Lets `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` load this folder.

The pipeline is flexvar-hf's own class, imported from the installed flexvar-hf package; nothing else runs.
`flexvar_hf.{class_name}.from_pretrained` loads the folder without this file.
"""

from flexvar_hf import {class_name}  # noqa: F401
'''


def class_name_entry(class_name: str) -> list[str]:
    """The `_class_name` that `model_index.json` stores: `[PIPELINE_MODULE, class_name]`."""
    return [PIPELINE_MODULE, class_name]


def write_pipeline_module(folder: str | os.PathLike, class_name: str) -> Path:
    """Write `folder/flexvar_pipeline.py`, which imports `class_name` from flexvar-hf; returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{PIPELINE_MODULE}.py"
    path.write_text(_MODULE_SOURCE.format(class_name=class_name))
    return path


def plain_class_name(config: dict) -> dict:
    """`config` with a list-form `_class_name` (`[module, class name]`) replaced by the class name."""
    class_name = config.get("_class_name")
    if isinstance(class_name, (list, tuple)) and len(class_name) == 2:
        config = {**config, "_class_name": class_name[1]}
    return config
