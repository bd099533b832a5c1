"""HDF5 weight files (Keras) through h5py: numeric datasets as lazy arrays, `.keras` zips included.

A `.keras` file is a zip whose `model.weights.h5` member Keras stores uncompressed: h5py reads it
in place through a window onto the archive (no copy); a compressed member is inflated into memory
within the npz budget. The file is opened once per round and its datasets are read when reduced
(h5py serializes calls into libhdf5, so the threads of a round may share it). A dataset whose declared size exceeds half of this
machine's memory is refused before it is read: HDF5 can declare any shape over a fill value.
Needs `pip install 'flowscan[keras]'` (h5py).
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import numpy as np

from flowscan.errors import ScanError
from flowscan.io.arrays import LoadedArray
from flowscan.io.location import is_remote, location
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


def open_weights(path) -> tuple[Any, dict | None]:
    """The open h5py.File of a .h5 file or of a .keras zip's weights, and the zip's `config.json`
    (None for .h5 files). Opened once per round: the lazy arrays read through it, and it closes
    when the last of them is gone. Errors name the file."""
    h5py = _h5py()
    path = location(path)
    raw = None
    try:
        if not is_keras_zip(path):   # local files through libhdf5's own driver; remote ones through fsspec
            return h5py.File(path.open("rb") if is_remote(path) else str(path), "r"), None
        raw = path.open("rb")
        source, config = _keras_zip(path, raw)
        return h5py.File(source, "r"), config
    except Exception as exc:  # noqa: BLE001 - libhdf5 damage surfaces as OSError, RuntimeError, KeyError ...
        if raw is not None:
            raw.close()
        if isinstance(exc, ScanError):
            raise
        raise ScanError(path, f"not a readable HDF5 file (truncated or corrupt?): {type(exc).__name__}: {exc}",
                        truncated=True) \
            from None


def _keras_zip(path, raw) -> tuple[Any, dict | None]:
    """(the weights member as a file, the parsed config.json) of a .keras zip."""
    try:
        zf = zipfile.ZipFile(raw)
    except zipfile.BadZipFile as exc:
        raise ScanError(path, f"not a .keras archive: {exc}") from None
    members = unique_members(path, zf)
    info = members.get(KERAS_WEIGHTS)
    if info is None:
        raise ScanError(path, f".keras archive without {KERAS_WEIGHTS}")
    config = _config(path, zf, members.get("config.json"))
    if info.compress_type == zipfile.ZIP_STORED:
        return _Window(raw, data_offset(raw, info), info.file_size), config
    if info.file_size > inflate_budget():
        raise ScanError(path, f"{KERAS_WEIGHTS} inflates to {info.file_size} bytes (refused)")
    return io.BytesIO(zf.read(info)), config


def _config(path, zf: zipfile.ZipFile, info: zipfile.ZipInfo | None) -> dict | None:
    if info is None:
        return None
    if info.file_size > MAX_CONFIG_BYTES:
        raise ScanError(path, f"config.json claims {info.file_size} bytes (refused)")
    try:
        config = json.loads(zf.read(info))
    except (zipfile.BadZipFile, ValueError, RecursionError) as exc:
        raise ScanError(path, f"unreadable config.json: {type(exc).__name__}: {exc}") from None
    return config if isinstance(config, dict) else None


def is_numeric(dataset) -> bool:
    dtype = getattr(dataset, "dtype", None)
    return dtype is not None and dtype.kind in "biuf" and dtype.itemsize > 0


def lazy(path, name: str, dataset) -> LoadedArray:
    """A dataset read when reduced (through the round's open file, which it keeps open)."""
    shape, dtype = tuple(int(n) for n in dataset.shape), dataset.dtype.newbyteorder("=")
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if nbytes > inflate_budget():
        raise ScanError(path, f"dataset declares {nbytes} bytes, more than half of this machine's memory "
                              "(refused)", tensor=name)

    def load() -> np.ndarray:
        try:
            data = np.asarray(dataset[()])
        except Exception as exc:  # noqa: BLE001 - as in open_weights
            raise ScanError(path, f"cannot read dataset {dataset.name}: {type(exc).__name__}: {exc}",
                            tensor=name) from None
        if data.shape != shape:
            raise ScanError(path, f"dataset {dataset.name} read as shape {data.shape}, declared {shape}", tensor=name)
        return data.astype(dtype, copy=False)
    return LoadedArray(shape, dtype, load)
