"""Writing folders and files so that a crash never leaves a half-written result in place, and nothing a user owns is
replaced.

`check_output_path` is the one rule for "may this path be written": a new path always; an existing one only when
overwriting was asked for, and then only a regular file (for file outputs) or a diffusers folder written by flexvar-hf
that holds nothing else (for folder outputs, `foreign_entries`), never the working directory or a folder above it.
`atomic_directory` and `atomic_files` apply it and write under temporary names renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# `_class_name`s of the folders flexvar-hf writes (model_index.json, config.json or scheduler_config.json).
OUR_CLASSES = frozenset(
    {
        "FlexVARPipeline",
        "FlexVARImg2ImgPipeline",
        "FlexVARInpaintPipeline",
        "FlexVAROutpaintPipeline",
        "FlexVARTransformer2DModel",
        "FlexVQModel",
        "FlexVARScaleScheduler",
    }
)
CONFIG_FILES = ("model_index.json", "config.json", "scheduler_config.json")
WEIGHTS_PREFIX = "diffusion_pytorch_model"  # weights, shards, their index and variants (".fp16")
WRITTEN_BESIDE = ("README.md", "training_summary.json")  # model cards and examples/train_vq.py's summary
OVERWRITE = "`overwrite=True` (`--overwrite` in the scripts)"


def _class_and_module(config_file: Path) -> tuple[str | None, str | None]:
    """The `_class_name` of a config file and, for the list form `[module, class name]` (a pipeline loadable by
    diffusers' generic `DiffusionPipeline.from_pretrained`), the file `module.py` that the folder holds for it."""
    try:
        name = json.loads(config_file.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None, None
    if isinstance(name, list) and len(name) == 2 and all(isinstance(part, str) for part in name):
        return name[1], f"{name[0]}.py"
    return (name, None) if isinstance(name, str) else (None, None)


def foreign_entries(folder: str | os.PathLike) -> list[str] | None:
    """
    The entries of `folder` (relative paths) that a diffusers folder written by flexvar-hf would not hold, or None
    when `folder` is not such a folder at all.

    Ours is a folder whose `model_index.json` (a pipeline), `config.json` (a model) or `scheduler_config.json` names
    one of `OUR_CLASSES` (plain, or as `[module, class name]` with the folder's `module.py` that names it for
    diffusers' generic loading). A pipeline folder holds that file and its component sub-folders; a model or scheduler
    folder holds its config and `diffusion_pytorch_model*` weight files; either may hold the files our scripts write
    beside them (`WRITTEN_BESIDE`: a model card, a training summary). Anything else is foreign: a user's file that
    replacing the folder would delete.
    """
    folder = Path(folder)
    config = next((folder / name for name in CONFIG_FILES if (folder / name).is_file()), None)
    class_name, module_file = _class_and_module(config) if config is not None else (None, None)
    if not folder.is_dir() or folder.is_symlink() or class_name not in OUR_CLASSES:
        return None
    foreign = []
    for entry in sorted(folder.iterdir()):
        if entry.name in (config.name, module_file, *WRITTEN_BESIDE) and entry.is_file() and not entry.is_symlink():
            continue
        if config.name == "model_index.json" and entry.is_dir():
            inner = foreign_entries(entry)
            foreign += [entry.name] if inner is None else [f"{entry.name}/{name}" for name in inner]
        elif config.name != "model_index.json" and entry.name.startswith(WEIGHTS_PREFIX) and entry.is_file():
            continue
        else:
            foreign.append(entry.name)
    return foreign


def check_output_path(path: str | os.PathLike, overwrite: bool = False, folder: bool = True) -> Path:
    """
    ValueError unless `path` may be written: it does not exist; or `overwrite` is set and it is a regular file (for
    a file output, `folder=False`) or a diffusers folder written by flexvar-hf with nothing else in it (for a folder
    output; `foreign_entries`). The working directory and the folders above it are never replaced. Returns `path`
    as a Path.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return path
    what = "folder" if folder else "file"
    if not overwrite:
        raise ValueError(f"Output {what} {str(path)!r} already exists; choose another path or pass {OVERWRITE}.")
    if path.is_symlink():
        raise ValueError(f"Output {what} {str(path)!r} is a symbolic link; not replacing it, choose another path.")
    if not folder:
        if not path.is_file():
            raise ValueError(f"Output file {str(path)!r} exists and is not a regular file; not replacing it.")
        return path
    if not path.is_dir():
        raise ValueError(f"Output folder {str(path)!r} exists and is a file, not a folder; not replacing it.")
    if path.resolve() in (Path.cwd(), *Path.cwd().parents):
        raise ValueError(f"Output folder {str(path)!r} is the working directory or holds it; not replacing it.")
    foreign = foreign_entries(path)
    if foreign is None:
        raise ValueError(
            f"Output folder {str(path)!r} exists and is not a diffusers folder written by flexvar-hf; {OVERWRITE} "
            "only replaces such folders. Choose another path."
        )
    if foreign:
        shown = ", ".join(foreign[:10]) + (f", ... ({len(foreign) - 10} more)" if len(foreign) > 10 else "")
        raise ValueError(
            f"Output folder {str(path)!r} holds files flexvar-hf did not write ({shown}); not replacing it. Move "
            "them or choose another path."
        )
    return path


def check_run_folder(output_dir: str | os.PathLike, final_folder: str) -> Path:
    """Before a training run: ValueError unless `output_dir` is a folder or does not exist yet, and the folder the run
    ends by replacing, `output_dir / final_folder`, is free or a flexvar-hf folder holding nothing else
    (`check_output_path`). Returns `output_dir` as a Path."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir {str(output_dir)!r} is a file, not a folder; choose a folder for the run.")
    check_output_path(output_dir / final_folder, overwrite=True)
    return output_dir


def _staging_path(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}"


@contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it is renamed to `path`, on error (also when the rename
    fails) it is removed and an existing `path` stays as it was.

    `path` must pass `check_output_path(path, overwrite)`, on entry and again when the block has finished (a `path`
    made meanwhile is checked too): with `overwrite`, an existing pipeline or model folder written by flexvar-hf is
    replaced, only after the new folder is complete.
    """
    path = check_output_path(path, overwrite, folder=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_path(path, "tmp")
    staging.mkdir()
    try:
        yield staging
        # Again: a `path` made while the block ran must not be renamed away and deleted unchecked.
        check_output_path(path, overwrite, folder=True)
        _replace_all([staging], [path])
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def atomic_files(*paths: str | os.PathLike, overwrite: bool = False) -> Iterator[list]:
    """Yield a temporary path beside each of `paths` (distinct files, each passing `check_output_path(path,
    overwrite, folder=False)` on entry and again when the block has finished); when the block succeeds they are
    renamed into place, on error all are removed and nothing is replaced (a failure while renaming puts back the
    files already replaced)."""
    paths = [check_output_path(path, overwrite, folder=False) for path in paths]
    resolved = [path.resolve() for path in paths]
    if len(set(resolved)) < len(resolved):
        raise ValueError(f"The output files {[str(path) for path in paths]} must be distinct paths.")
    staging = [_staging_path(path, "tmp") for path in paths]
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
        yield staging
        for path in paths:  # again: a file made while the block ran must not be replaced unchecked
            check_output_path(path, overwrite, folder=False)
        _replace_all(staging, paths)
    finally:
        for temporary in staging:
            temporary.unlink(missing_ok=True)


def _replace_all(sources: list[Path], targets: list[Path]) -> None:
    """Rename each source (a file or a folder) onto its target, all or none: an existing target is moved aside first
    (so each rename goes to a free path) and deleted once every source is in place. If a rename fails, each target
    already placed is removed (it is ours) and the originals are moved back; nothing else is touched."""
    placed = []  # (target, its moved-aside original or None), for the targets that now hold their source
    try:
        for source, target in zip(sources, targets):
            backup = _staging_path(target, "old") if target.exists() else None
            if backup is not None:
                target.rename(backup)
            try:
                source.rename(target)
            except BaseException:
                if backup is not None:
                    backup.rename(target)
                raise
            placed.append((target, backup))
    except BaseException:
        for target, backup in reversed(placed):
            _remove(target)
            if backup is not None:
                backup.rename(target)
        raise
    for _, backup in placed:
        if backup is not None:
            _remove(backup)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink()


def atomic_save(save, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Call `save(tmp_path)` for a file, then rename it to `path` (same folder, so the rename is atomic); an existing
    `path` is replaced only with `overwrite` (the default, as `torch.save` does) and when it is a regular file."""
    with atomic_files(path, overwrite=overwrite) as (staging,):
        save(staging)
    return Path(path)
