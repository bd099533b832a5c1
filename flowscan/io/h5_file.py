"""HDF5 weight files (Keras) through h5py: numeric datasets as lazy arrays, `.keras` zips included.

A `.keras` file is a zip whose `model.weights.h5` member Keras stores uncompressed: h5py reads it
in place through a window onto the archive (no copy); a compressed member is inflated into memory
within the npz budget. The file is opened once per round and its datasets are read when reduced
(h5py serializes calls into libhdf5, so the threads of a round may share it).

Nothing outside the file is read: before any dataset is touched, every link of the file is
checked, and external links (to another file), user-defined links, datasets with external raw
storage and virtual datasets (whose data lives in other files) are refused by name; soft links
stay inside the file. Datasets are reduced in slices (`ChunkedArray`), so memory stays bounded
whatever a dataset declares; one that declares far more than it stores (a fill value, or more than
deflate can compress) is refused before it is read. Needs `pip install 'flowscan[keras]'` (h5py).
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import numpy as np

from flowscan import extras
from flowscan.errors import ScanError
from flowscan.io.arrays import ChunkedArray
from flowscan.io.location import is_remote, location
from flowscan.io.budget import BUDGET
from flowscan.io.zip_members import data_offset, unique_members

KERAS_WEIGHTS = "model.weights.h5"
MAX_CONFIG_BYTES = 64 << 20
# Declared bytes per stored byte beyond which a dataset is refused: deflate, the strongest filter
# Keras files use, cannot exceed about 1032:1, so more means unallocated chunks over a fill value.
MAX_EXPANSION = 2048
SMALL_DATASET = 64 << 20   # datasets up to this size are read whatever they store


def _h5py():
    return extras.require("h5py", "reading Keras .h5/.keras files")


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
            f, config = h5py.File(path.open("rb") if is_remote(path) else str(path), "r"), None
        else:
            raw = path.open("rb")
            source, config = _keras_zip(path, raw)
            f = h5py.File(source, "r")
        try:
            check_self_contained(f, path)
        except BaseException:
            f.close()
            raise
        return f, config
    except Exception as exc:  # noqa: BLE001 - libhdf5 damage surfaces as OSError, RuntimeError, KeyError ...
        if raw is not None:
            raw.close()
        if isinstance(exc, ScanError):   # zip-level refusals name no file yet: this one
            raise ScanError(exc.path or path, exc.message, exc.tensor, truncated=exc.truncated) from None
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
        return _Window(raw, data_offset(raw, info, path), info.file_size), config
    held = BUDGET.take(info.file_size, path, f"inflating its compressed {KERAS_WEIGHTS}")
    try:
        source = io.BytesIO(zf.read(info))
    except BaseException:
        held.release()
        raise
    held.tie(source)   # given back when the round's HDF5 file lets go of it
    return source, config


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


MAX_DEPTH = 64          # groups within groups; a Keras model nests a handful
MAX_LINKS = 1 << 20     # links in one file; a large model has thousands


def check_self_contained(f, path) -> None:
    """Refuse, by name, every link or dataset of an open HDF5 file whose bytes lie in another file.

    libhdf5's own visits, once each: every link with its type (H5Lvisit), then every object with its
    type (H5Ovisit: each object once, whatever hard links say), opening only the datasets. h5py's
    visititems opened every object by its full path, quadratic in the nesting. At most MAX_DEPTH
    groups deep and MAX_LINKS links."""
    h5py = _h5py()
    problems: list[str] = []
    refused: list[str] = []   # a limit crossed: the visit stops (an exception inside it would be lost)
    count = [0]

    def bounded(name: bytes) -> str | None:
        count[0] += 1
        text = name.decode("utf-8", "backslashreplace")
        if count[0] > MAX_LINKS:
            refused.append(f"holds more than {MAX_LINKS} links (refused as a resource attack)")
        elif text.count("/") >= MAX_DEPTH:
            refused.append(f"{text[:80]}...: groups nested more than {MAX_DEPTH} deep (refused)")
        return None if refused else text

    def link(name, info):
        text = bounded(name)
        if text is None:
            return True
        if info.type == h5py.h5l.TYPE_EXTERNAL:
            target = f.get(text, getlink=True)
            problems.append(f"{text} is an external link to {target.filename}:{target.path}")
        elif info.type not in (h5py.h5l.TYPE_HARD, h5py.h5l.TYPE_SOFT):
            problems.append(f"{text} is a {type(f.get(text, getlink=True)).__name__} (a user-defined link)")
        return True if problems else None

    datasets: list[str] = []

    def item(name, info):
        if info.type == h5py.h5o.TYPE_DATASET:
            datasets.append(name.decode("utf-8", "surrogateescape"))
        return None

    f.id.links.visit(link, info=True)
    if refused:
        raise ScanError(path, refused[0])
    if not problems:
        h5py.h5o.visit(f.id, item, info=True)
        for name in datasets:
            problems.extend(_outside(f[name], name))
    if problems:
        raise ScanError(path, f"{problems[0]} (refused: flowscan reads nothing outside the checkpoint"
                              + (f"; {len(problems) - 1} more" if len(problems) > 1 else "") + ")")


def _outside(dataset, name: str) -> list[str]:
    if dataset.is_virtual:
        sources = sorted({m.file_name for m in dataset.virtual_sources()})
        return [f"dataset {name} is virtual, its data in {', '.join(sources)}"]
    if dataset.external:
        return [f"dataset {name} keeps its data outside the file, in "
                f"{', '.join(str(e[0]) for e in dataset.external)}"]
    return []


def is_numeric(dataset) -> bool:
    dtype = getattr(dataset, "dtype", None)
    return dtype is not None and dtype.kind in "biuf" and dtype.itemsize > 0


def lazy(path, name: str, dataset) -> ChunkedArray:
    """A dataset read slice by slice when reduced (through the round's open file, which it keeps open)."""
    shape, dtype = tuple(int(n) for n in dataset.shape), dataset.dtype.newbyteorder("=")
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if nbytes > SMALL_DATASET:
        stored = int(dataset.id.get_storage_size())
        if nbytes > MAX_EXPANSION * max(stored, 1):
            raise ScanError(path, f"dataset declares {nbytes} bytes but stores {stored} (a fill value or "
                                  f"an expansion beyond {MAX_EXPANSION}:1; refused)", tensor=name)

    def read(index) -> np.ndarray:
        try:
            return np.asarray(dataset[index]).astype(dtype, copy=False)
        except Exception as exc:  # noqa: BLE001 - as in open_weights
            raise ScanError(path, f"cannot read dataset {dataset.name}: {type(exc).__name__}: {exc}",
                            tensor=name) from None
    return ChunkedArray(shape, dtype, read, _chunk_rows(path, name, dataset, shape, dtype))


def _chunk_rows(path, name: str, dataset, shape, dtype) -> int | None:
    """Rows of a band of whole chunks, for a filtered (compressed) chunked dataset: libhdf5 decompresses
    a whole chunk for any part of it, and its chunk cache (1 MiB) keeps none of the large ones."""
    if not shape or dataset.chunks is None or dataset.id.get_create_plist().get_nfilters() == 0:
        return None
    rows = int(dataset.chunks[0])
    need = ChunkedArray.band_bytes(shape, dtype, rows)
    if need > BUDGET.total:
        raise ScanError(path, f"chunks of shape {dataset.chunks} over shape {shape} must be held {need:,} "
                              f"bytes at a time to be decompressed once each, more than the memory budget of "
                              f"{BUDGET.total:,} (refused)", tensor=name)
    return rows
