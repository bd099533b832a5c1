"""Lazily materialized, file-backed arrays.

Readers hand out `StoredArray`s: shape and dtype are known from the file's index, and the data
is a zero-copy view into a memory map, made only when the reducer asks for it. `release()` tells
the kernel the pages may go, which keeps resident memory near one tensor whatever the archive
size.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# numpy has no bfloat16: such data is read as uint16 and widened to float32 on demand.
BFLOAT16 = "bfloat16"
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class Region:
    """A byte range of a memory-mapped file holding one storage."""

    mm: mmap.mmap
    path: Path
    offset: int
    nbytes: int

    def raw(self, dtype: np.dtype, count: int) -> np.ndarray:
        return np.frombuffer(self.mm, dtype=dtype, count=count, offset=self.offset)

    def release(self) -> None:
        start = self.offset - self.offset % _PAGE
        length = self.offset + self.nbytes - start
        if length > 0 and hasattr(self.mm, "madvise"):
            try:
                self.mm.madvise(mmap.MADV_DONTNEED, start, length)
            except (OSError, ValueError):  # advice only; harmless if refused
                pass


def map_file(path: Path) -> mmap.mmap:
    """Read-only memory map of a whole file (empty files cannot be mapped)."""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


class StoredArray:
    """A strided view of a storage in a file; `np.asarray()` materializes it (zero-copy)."""

    __slots__ = ("shape", "dtype", "_storage", "_offset", "_stride")

    def __init__(self, storage: "Storage", offset: int, shape: tuple[int, ...],
                 stride: tuple[int, ...] | None = None):
        self._storage = storage
        self._offset = int(offset)
        self.shape = tuple(int(s) for s in shape)
        self._stride = tuple(int(s) for s in stride) if stride is not None else _contiguous(self.shape)
        self.dtype = storage.dtype

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def __array__(self, dtype=None, copy=None):
        st = self._storage
        item = np.dtype(np.uint16 if st.dtype == BFLOAT16 else st.dtype)
        if self.size == 0:
            arr = np.zeros(self.shape, dtype=item)
        else:
            last = self._offset + sum((n - 1) * s for n, s in zip(self.shape, self._stride))
            if self._offset < 0 or last >= st.numel:
                raise ValueError(f"tensor view [{self._offset}..{last}] lies outside its storage of {st.numel} elements")
            base = st.region.raw(item, st.numel)[self._offset:]
            arr = np.lib.stride_tricks.as_strided(
                base, self.shape, tuple(s * item.itemsize for s in self._stride), writeable=False)
        if st.dtype == BFLOAT16:
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return _as_requested(arr, dtype, copy)

    def release(self) -> None:
        self._storage.region.release()

    def __repr__(self) -> str:
        return f"StoredArray(shape={self.shape}, dtype={self.dtype})"


@dataclass
class Storage:
    """A typed, flat storage; its region is filled in once the file's layout is known."""

    dtype: object  # np.dtype or BFLOAT16
    numel: int
    region: Region | None = None


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


def itemsize(dtype: object) -> int:
    return 2 if dtype == BFLOAT16 else np.dtype(dtype).itemsize


class LoadedArray:
    """An array read on demand by a callback (formats that cannot be memory-mapped, e.g. npz)."""

    __slots__ = ("shape", "dtype", "_load")

    def __init__(self, shape, dtype, load):
        self.shape, self.dtype, self._load = tuple(shape), dtype, load

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def __array__(self, dtype=None, copy=None):
        return _as_requested(self._load(), dtype, copy)

    def release(self) -> None:
        pass


def _as_requested(arr: np.ndarray, dtype, copy) -> np.ndarray:
    """numpy's __array__ protocol: copy=True must give a fresh (writable) array."""
    if dtype is not None and np.dtype(dtype) != arr.dtype:
        return arr.astype(dtype)
    return arr.copy() if copy else arr
