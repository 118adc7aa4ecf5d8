"""Writing folders and files so that a crash never leaves a half-written result in place."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it is renamed to `path`, on error it is removed.

    With `overwrite`, an existing `path` is replaced only after the new folder is complete.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ValueError(f"Output folder {str(path)!r} already exists; choose another or allow overwriting.")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if path.exists():
        retired = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        path.rename(retired)
        staging.rename(path)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(path)


def atomic_save(save, path: str | os.PathLike) -> Path:
    """Call `save(tmp_path)` for a file, then rename it to `path` (same folder, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        save(staging)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return path
