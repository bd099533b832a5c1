"""HDF5 weight files (Keras) through h5py: numeric datasets as lazy arrays, `.keras` zips included.

A `.keras` file is a zip whose `model.weights.h5` member Keras stores uncompressed: h5py reads it
in place through a window onto the archive (no copy); a compressed member is inflated into memory
within the npz budget. Datasets are read only when reduced, each through a fresh handle (so worker
threads and processes never share one). A dataset whose declared size exceeds half of this
machine's memory is refused before it is read: HDF5 can declare any shape over a fill value.
Needs `pip install 'flowscan[keras]'` (h5py).
"""

from __future__ import annotations

import io
import json
import zipfile
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

from flowscan.errors import ScanError
from flowscan.io.arrays import LoadedArray
from flowscan.io.location import location
from flowscan.io.npz_file import inflate_budget
from flowscan.io.zip_members import data_offset, unique_members

KERAS_WEIGHTS = "model.weights.h5"
MAX_CONFIG_BYTES = 64 << 20


def _h5py():
    try:
        import h5py
    except ImportError:
        raise ScanError(None, "reading Keras .h5/.keras files needs h5py: pip install 'flowscan[keras]'") from None
    return h5py


class _Window(io.RawIOBase):
    """A read-only, seekable view of bytes [start, start + size) of an open file."""

    def __init__(self, f, start: int, size: int):
        self._f, self._start, self._size, self._pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self._size - self._pos))
        if n == 0:
            return 0
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)


def is_keras_zip(path) -> bool:
    return location(path).name.lower().endswith(".keras")


@contextmanager
def open_h5(path) -> Iterator[Any]:
    """An open h5py.File of a .h5 file or of a .keras zip's weights; errors name the file."""
    h5py = _h5py()
    path = location(path)
    try:
        with path.open("rb") as raw:
            if is_keras_zip(path):
                source = _keras_member(path, raw)
            else:
                source = raw
            with h5py.File(source, "r") as f:
                yield f
    except ScanError:
        raise
    except Exception as exc:  # noqa: BLE001 - libhdf5 damage surfaces as OSError, RuntimeError, KeyError ...
        raise ScanError(path, f"not a readable HDF5 file (truncated or corrupt?): {type(exc).__name__}: {exc}") \
            from None


def _keras_member(path, raw):
    try:
        zf = zipfile.ZipFile(raw)
    except zipfile.BadZipFile as exc:
        raise ScanError(path, f"not a .keras archive: {exc}") from None
    members = unique_members(path, zf)
    info = members.get(KERAS_WEIGHTS)
    if info is None:
        raise ScanError(path, f".keras archive without {KERAS_WEIGHTS}")
    if info.compress_type == zipfile.ZIP_STORED:
        return _Window(raw, data_offset(raw, info), info.file_size)
    if info.file_size > inflate_budget():
        raise ScanError(path, f"{KERAS_WEIGHTS} inflates to {info.file_size} bytes (refused)")
    return io.BytesIO(zf.read(info))


def keras_config(path) -> dict | None:
    """The `config.json` of a .keras zip (None for plain .h5 files)."""
    path = location(path)
    if not is_keras_zip(path):
        return None
    with path.open("rb") as raw:
        try:
            zf = zipfile.ZipFile(raw)
            info = unique_members(path, zf).get("config.json")
            if info is None:
                return None
            if info.file_size > MAX_CONFIG_BYTES:
                raise ScanError(path, f"config.json claims {info.file_size} bytes (refused)")
            config = json.loads(zf.read(info))
        except ScanError:
            raise
        except zipfile.BadZipFile as exc:
            raise ScanError(path, f"not a .keras archive: {exc}") from None
        except (ValueError, RecursionError) as exc:
            raise ScanError(path, f"unreadable config.json: {type(exc).__name__}: {exc}") from None
    return config if isinstance(config, dict) else None


def is_numeric(dataset) -> bool:
    dtype = getattr(dataset, "dtype", None)
    return dtype is not None and dtype.kind in "biuf" and dtype.itemsize > 0


def lazy(path, name: str, dataset) -> LoadedArray:
    """A dataset read when reduced (the file is opened again then)."""
    shape, dtype = tuple(int(n) for n in dataset.shape), dataset.dtype.newbyteorder("=")
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if nbytes > inflate_budget():
        raise ScanError(path, f"dataset declares {nbytes} bytes, more than half of this machine's memory "
                              "(refused)", tensor=name)
    where = dataset.name

    def load() -> np.ndarray:
        with open_h5(path) as f:
            try:
                data = f[where][()]
            except Exception as exc:  # noqa: BLE001 - as above
                raise ScanError(path, f"cannot read dataset {where}: {type(exc).__name__}: {exc}",
                                tensor=name) from None
        data = np.asarray(data)
        if data.shape != shape:
            raise ScanError(path, f"dataset {where} read as shape {data.shape}, declared {shape}", tensor=name)
        return data.astype(dtype, copy=False)
    return LoadedArray(shape, dtype, load)
