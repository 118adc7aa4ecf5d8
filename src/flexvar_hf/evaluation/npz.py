"""Reading and writing the ADM suite's `.npz` batches without holding them in memory.

An ADM batch is a numpy `.npz` (a zip of `.npy` files) with `arr_0`, uint8 images `(N, H, W, 3)`; sample batches of
class-conditional models add `arr_1`, their labels `(N,)`, and reference batches add `mu` / `sigma`, the FID
statistics of the Inception pool features. 50,000 samples at 256x256 are 9.8 GB, so arrays are streamed.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ..utils.io import atomic_save


def _read_header(stream) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    return np.lib.format.read_array_header_2_0(stream)


def _member(archive: zipfile.ZipFile, path: str | Path, key: str) -> str:
    name = f"{key}.npy"
    if name not in archive.namelist():
        keys = sorted(member.removesuffix(".npy") for member in archive.namelist())
        raise ValueError(f"{str(path)!r} has no `{key}` array (it holds {keys}).")
    return name


def npz_keys(path: str | Path) -> list[str]:
    """The array names in the `.npz` at `path`; ValueError if it is not a readable `.npz`."""
    try:
        with zipfile.ZipFile(path) as archive:
            return sorted(member.removesuffix(".npy") for member in archive.namelist())
    except (OSError, zipfile.BadZipFile) as error:
        raise ValueError(f"Cannot read {str(path)!r} as an .npz file: {error}") from error


def npz_array_header(path: str | Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """`(shape, dtype)` of array `key` of the `.npz` at `path`, read from its header alone; ValueError if the file
    is not a readable `.npz` or has no such array."""
    npz_keys(path)
    with zipfile.ZipFile(path) as archive, archive.open(_member(archive, path, key)) as stream:
        shape, _, dtype = _read_header(stream)
    return tuple(shape), dtype


def iter_npz_batches(path: str | Path, key: str, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive batches of at most `batch_size` rows of array `key` (C order), read from the file as needed
    (writable arrays, one batch in memory at a time)."""
    with zipfile.ZipFile(path) as archive, archive.open(_member(archive, path, key)) as stream:
        shape, fortran_order, dtype = _read_header(stream)
        if fortran_order or dtype.hasobject:
            raise ValueError(f"`{key}` of {str(path)!r} must be a plain C-ordered array.")
        for begin in range(0, shape[0], batch_size):
            batch = np.empty((min(batch_size, shape[0] - begin), *shape[1:]), dtype=dtype)
            buffer, filled = memoryview(batch).cast("B"), 0
            while filled < len(buffer):
                count = stream.readinto(buffer[filled:])
                if not count:
                    raise ValueError(f"`{key}` of {str(path)!r} is truncated.")
                filled += count
            yield batch


def write_npz(path: str | Path, arrays: dict[str, tuple[tuple[int, ...], np.dtype, Iterable[np.ndarray]]]) -> Path:
    """
    Write an uncompressed `.npz` (as `np.savez`) atomically, each array given as `(shape, dtype, chunks)`: its chunks
    are written one after another along the first dimension, so the whole array is never in memory. Raises
    ValueError (and leaves nothing) if the chunks do not add up to `shape`.
    """

    def save(staging: Path) -> None:
        with zipfile.ZipFile(staging, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for key, (shape, dtype, chunks) in arrays.items():
                dtype = np.dtype(dtype)
                header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
                with archive.open(f"{key}.npy", "w", force_zip64=True) as stream:
                    np.lib.format.write_array_header_1_0(stream, header)
                    rows = 0
                    for chunk in chunks:
                        chunk = np.ascontiguousarray(chunk, dtype=dtype)
                        if chunk.shape[1:] != tuple(shape[1:]):
                            raise ValueError(f"`{key}` chunk of shape {chunk.shape} does not fit {tuple(shape)}.")
                        stream.write(chunk.data)
                        rows += len(chunk)
                    if rows != shape[0]:
                        raise ValueError(f"`{key}` got {rows} rows, its shape says {shape[0]}.")

    return atomic_save(save, path)

