"""Lazily materialized, file-backed arrays that a hostile file cannot point outside its bytes.

Readers hand out `StoredArray`s: shape and dtype come from the file's index and the data is a
zero-copy view into a memory map, made only when the reducer asks for it. Every object here is
immutable once built, because the unpickler hands them to a pickle's instructions (which could
otherwise rewrite a storage's size or dtype), and every view is checked against its storage over
all of its elements before numpy sees it. `release()` tells the kernel the pages may go, which
keeps resident memory near one tensor whatever the archive size.
"""

from __future__ import annotations

import functools
import math
import mmap
import zlib

try:   # python-isal's CRC-32 runs at about 10 GB/s here, zlib's at 2: verification then costs little
    from isal.isal_zlib import crc32
    FAST_CRC = True
except ImportError:  # pragma: no cover - isal is a dependency; kept working without it
    crc32, FAST_CRC = zlib.crc32, False
from pathlib import Path

import numpy as np

from flowscan.errors import ScanError
from flowscan.io.budget import BUDGET
from flowscan.io.location import RemoteBytes, location, lost_pages

# numpy has no bfloat16: such data is read as uint16 and widened to float32 on demand.
BFLOAT16 = "bfloat16"
_PAGE = mmap.PAGESIZE
MAX_DIMS = 32                 # numpy's own limit is 64; no real weight has more than 5
# A view may repeat storage elements (stride 0, e.g. torch's expand) only up to this many
# elements in all; beyond it a few stored bytes could claim a tensor that takes hours to reduce.
MAX_REPEATED_ELEMENTS = 1 << 24
# Bytes of read storages handed back to the kernel at a time: resident memory stays below this
# plus one tensor per job. Each hand-back interrupts the other threads (a TLB flush), so a file
# smaller than this is simply unmapped when closed (8 bfloat16 ResNet-50 rounds at -j2: 8 MiB
# batches 0.18 s, 32 MiB 0.16 s, none 0.14 s, medians on a noisy 2-core VM).
RELEASE_BATCH = 64 << 20


class Frozen:
    """Instances refuse attribute changes after __init__ (pickle BUILD cannot touch them)."""

    __slots__ = ()

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is read-only")

    __delattr__ = __setattr__

    def _init(self, **values) -> None:
        for key, value in values.items():
            object.__setattr__(self, key, value)


_ITEMSIZES: dict = {}


def itemsize(dtype: object) -> int:
    try:   # asked about a dozen times per tensor: np.dtype() is the slow part
        return _ITEMSIZES[dtype]
    except KeyError:
        size = 2 if dtype == BFLOAT16 else np.dtype(dtype).itemsize
        if len(_ITEMSIZES) < 256:   # bounded: a file may name many exotic dtypes
            _ITEMSIZES[dtype] = size
        return size


_STORED_DTYPES: dict = {}


def is_bfloat16(dtype: object) -> bool:
    # numpy dtypes compared with a string parse it first: test the type before the value
    return type(dtype) is str and dtype == BFLOAT16


def stored_dtype(dtype: object) -> np.dtype:
    """The numpy dtype an array's bytes are viewed as: bfloat16 as its raw uint16 bits."""
    try:
        return _STORED_DTYPES[dtype]
    except KeyError:
        item = np.dtype(np.uint16 if dtype == BFLOAT16 else dtype)
        if len(_STORED_DTYPES) < 256:
            _STORED_DTYPES[dtype] = item
        return item


def widen_bfloat16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values stored as uint16 bits, as float32 (exact)."""
    widened = np.empty(bits.shape, dtype=np.uint32)
    np.left_shift(bits, 16, out=widened, dtype=np.uint32, casting="unsafe")
    return widened.view(np.float32)   # stays an array for 0-d tensors too


class _PendingRelease:
    """Byte ranges of read storages not yet handed back to the kernel, and their total."""

    __slots__ = ("ranges", "nbytes")

    def __init__(self):
        self.ranges, self.nbytes = [], 0

    def add(self, start: int, end: int) -> bool:
        """Note a range; True when the batch is full."""
        self.ranges.append((start, end))
        self.nbytes += end - start
        return self.nbytes >= RELEASE_BATCH

    def take(self) -> list[tuple[int, int]]:
        """The ranges noted, adjacent or overlapping ones merged, in file order; the batch empties."""
        merged: list[list[int]] = []
        for start, end in sorted(self.ranges):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self.ranges, self.nbytes = [], 0
        return [(start, end) for start, end in merged]


class StorageFile(Frozen):
    """The storages of one file: where each one's bytes are, and their checksums.

    Storages are registered by the reader as it finds them (`set_region`); a tensor view is accepted
    only over a storage of this very object, so nothing a pickle builds can stand in for one.
    CRC-32s (zip members) are checked once per storage, on its first full read.
    """

    __slots__ = ("path", "_mm", "_regions", "_crc", "_verified", "_unneeded")

    def __init__(self, path: Path, mm: "mmap.mmap | RemoteBytes | None"):
        self._init(path=location(path), _mm=mm, _regions={}, _crc={}, _verified=set(),
                   _unneeded=_PendingRelease())

    def set_region(self, key: str, offset: int, nbytes: int, crc: int | None = None,
                   crc_prefix: int = 0) -> None:
        """Where storage `key` lies; `crc` covers its bytes and the `crc_prefix` bytes before."""
        size = len(self._mm) if self._mm is not None else 0
        if offset < crc_prefix or nbytes < 0 or (nbytes and offset + nbytes > size):
            raise ScanError(self.path, f"storage {key} extends past the end of the file (truncated?)",
                            truncated=True)
        if key in self._regions:
            raise ScanError(self.path, f"storage {key} appears twice in the file")
        self._regions[key] = (offset, nbytes)
        if crc is not None:
            self._crc[key] = (crc, crc_prefix)

    def raw(self, key: str, dtype: np.dtype, count: int) -> np.ndarray:
        offset, nbytes = self._region(key)
        if count == 0:
            return np.zeros(0, dtype=dtype)
        if count * itemsize(dtype) > nbytes:
            raise ScanError(self.path, f"storage {key} holds {nbytes} bytes, fewer than its tensors need")
        if isinstance(self._mm, RemoteBytes):
            return np.frombuffer(self._mm.fetch(offset, nbytes), dtype=dtype, count=count)
        return np.frombuffer(self._mm, dtype=dtype, count=count, offset=offset)

    def _region(self, key: str) -> tuple[int, int]:
        try:
            return self._regions[key]
        except KeyError:
            raise ScanError(self.path, f"storage {key} has no data in the file") from None

    def release(self, key: str) -> None:
        """Let the kernel drop the pages of a storage that has been read. Storages are handed back
        in batches of RELEASE_BATCH bytes, adjacent ones in one call: each call flushes the TLB of
        every thread of the process, which per tensor cost a fifth of the scan's time. (What a file
        still holds when it is closed goes with its mapping.)"""
        offset, nbytes = self._regions.get(key, (0, 0))
        if isinstance(self._mm, RemoteBytes):
            self._mm.forget(offset, nbytes)
            return
        if nbytes <= 0 or not hasattr(self._mm, "madvise"):
            return
        if self._unneeded.add(offset - offset % _PAGE, offset + nbytes):
            for start, end in self._unneeded.take():
                self._advise_unneeded(start, end)

    def _advise_unneeded(self, start: int, end: int) -> None:
        # whole pages only: the last one may hold the start of a storage not yet read
        end -= end % _PAGE if end < len(self._mm) else 0
        if end > start:
            try:
                self._mm.madvise(mmap.MADV_DONTNEED, start, end - start)
            except (OSError, ValueError):  # advice only; harmless if refused
                pass

    def check_intact(self) -> None:
        """Refuse what was read from a file that shrank while mapped (its lost pages read as zeros)."""
        if lost_pages(self._mm):
            raise ScanError(self.path, "the file shrank while it was being read (a copy still in "
                                       "progress, or a sync tool?): its tensors were not read whole")

    def region_size(self, key: str) -> int:
        return self._region(key)[1]

    # -- integrity ---------------------------------------------------------------------------
    def region_bytes(self, key: str) -> np.ndarray:
        """All bytes of a storage's region, zero-copy."""
        offset, nbytes = self._region(key)
        return self.raw(key, np.uint8, nbytes)

    def crc_start(self, key: str) -> int:
        """The running CRC-32 of the bytes before a storage that its checksum also covers."""
        offset, _nbytes = self._region(key)
        prefix = self._crc[key][1]
        return crc32(self._mm[offset - prefix:offset]) if prefix else 0

    def needs_check(self, key: str) -> bool:
        return key in self._crc and key not in self._verified

    def check(self, key: str, crc: int) -> None:
        """Compare a CRC-32 computed over a storage's whole region with the archive's."""
        expected = self._crc[key][0] if key in self._crc else None
        if expected is not None and crc != expected:
            raise ScanError(self.path, f"storage {key} fails its CRC-32 check: the file is corrupt "
                                       f"(stored {expected:08x}, read {crc:08x})")
        self._verified.add(key)

    def check_whole(self, key: str) -> None:
        """Checksum a storage in one pass (for views that do not cover their storage in order)."""
        if self.needs_check(key):
            crc, data, step = self.crc_start(key), self.region_bytes(key), 1 << 22
            for start in range(0, data.size, step):
                crc = crc32(data[start:start + step], crc)
            self.check(key, crc)


class Checksum:
    """CRC-32 of a storage computed alongside the reduction of a tensor that covers it in order,
    so the bytes are checked while they are in cache (no second read of the file)."""

    __slots__ = ("_file", "_key", "_bytes", "_item", "_crc")

    def __init__(self, array: "StoredArray"):
        st = array.storage
        self._file, self._key, self._item = st.file, st.key, itemsize(array.dtype)
        self._crc = st.file.crc_start(st.key)
        self._bytes = st.file.region_bytes(st.key)

    @staticmethod
    def for_array(array) -> "Checksum | None":
        """A running checksum for `array`, or None (nothing to check, or checked separately)."""
        if not isinstance(array, StoredArray) or not array.storage.file.needs_check(array.storage.key):
            return None
        if not array.covers_storage:
            array.storage.file.check_whole(array.storage.key)
            return None
        return Checksum(array)

    def update(self, start: int, stop: int) -> None:
        """Add elements [start, stop) of the flattened tensor (in order)."""
        self._crc = crc32(self._bytes[start * self._item:stop * self._item], self._crc)

    def finish(self) -> None:
        self._file.check(self._key, self._crc)


class Storage(Frozen):
    """A typed, flat storage of a `StorageFile`, named by its key in that file."""

    __slots__ = ("dtype", "numel", "file", "key")

    def __init__(self, dtype: object, numel: int, file: StorageFile, key: str):
        if type(numel) is not int or numel < 0:
            raise ScanError(file.path, f"storage {key} claims {numel!r} elements")
        self._init(dtype=dtype, numel=numel, file=file, key=str(key))

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


class StoredArray(Frozen):
    """A strided view of a storage; `np.asarray()` materializes it (zero-copy).

    The view is validated when built: integer shape and strides, and every element it can
    address inside the storage (any stride sign, zero strides, arbitrary-size integers).
    """

    __slots__ = ("shape", "dtype", "storage", "offset", "stride")

    def __init__(self, storage: Storage, offset, shape, stride=None, *, owner: StorageFile,
                 dtype: object = None, tensor: str | None = None):
        if type(storage) is not Storage or storage.file is not owner:
            raise ScanError(owner.path, f"a tensor is built over {_describe(storage)}, not over a "
                                        "storage of this file (refused)", tensor=tensor)
        shape = _int_tuple(shape, owner.path, "shape", tensor)
        stride = contiguous_strides(shape) if stride is None else _int_tuple(stride, owner.path, "stride", tensor)
        if not isinstance(offset, int) or isinstance(offset, bool):
            raise ScanError(owner.path, f"storage offset {offset!r} is not an integer", tensor=tensor)
        dtype = storage.dtype if dtype is None else dtype
        _check_view(storage, offset, shape, stride, dtype, owner.path, tensor)
        self._init(shape=shape, dtype=dtype, storage=storage, offset=offset, stride=stride)

    @classmethod
    def whole(cls, storage: Storage, shape: tuple[int, ...], *, owner: StorageFile,
              tensor: str | None = None) -> "StoredArray":
        """All of `storage` in C order, as safetensors lays a tensor out: a shape of non-negative
        ints whose size is the storage's is all there is to check (no offset, no strides)."""
        if type(storage) is not Storage or storage.file is not owner:
            raise ScanError(owner.path, f"a tensor is built over {_describe(storage)}, not over a "
                                        "storage of this file (refused)", tensor=tensor)
        if type(shape) is not tuple or not all(type(v) is int and v >= 0 for v in shape):
            raise ScanError(owner.path, f"tensor shape {shape!r} is not non-negative integers", tensor=tensor)
        if len(shape) > MAX_DIMS or math.prod(shape) != storage.numel:
            raise ScanError(owner.path, f"tensor of shape {shape} does not fill its storage of "
                                        f"{storage.numel} elements", tensor=tensor)
        view = object.__new__(cls)
        view._init(shape=shape, dtype=storage.dtype, storage=storage, offset=0, stride=contiguous_strides(shape))
        return view

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def covers_storage(self) -> bool:
        """True when the view is its whole storage in order (its bytes are the storage's bytes)."""
        st = self.storage
        return (self.offset == 0 and self.stride == contiguous_strides(self.shape)
                and self.size * itemsize(self.dtype) == st.file.region_size(st.key))

    def stored(self) -> np.ndarray:
        """The view as stored, zero-copy and read-only: bfloat16 as its raw uint16 bits."""
        flat = self._contiguous()
        if flat is not None:
            return flat.reshape(self.shape)
        item = stored_dtype(self.dtype)
        st = self.storage
        base = st.file.raw(st.key, item, st.nbytes // item.itemsize)[self.offset:]
        return np.lib.stride_tricks.as_strided(
            base, self.shape, tuple(s * item.itemsize for s in self.stride), writeable=False)

    def flat(self, raw: bool = False) -> np.ndarray:
        """The view flattened (zero-copy when contiguous); bfloat16 as its raw bits with `raw`,
        else widened to float32."""
        flat = self._contiguous()
        if flat is None:
            flat = self.stored().reshape(-1)
        return widen_bfloat16(flat) if is_bfloat16(self.dtype) and not raw else flat

    def _contiguous(self) -> np.ndarray | None:
        """The elements as a read-only 1-D array when the view is C-contiguous (the common case,
        without as_strided's cost), else None."""
        if self.stride != contiguous_strides(self.shape):
            return None
        item, st, size = stored_dtype(self.dtype), self.storage, self.size
        if size == 0:
            return np.zeros(0, dtype=item)
        arr = st.file.raw(st.key, item, self.offset + size)[self.offset:]
        arr.flags.writeable = False
        return arr

    def __array__(self, dtype=None, copy=None):
        arr = self.stored()
        if is_bfloat16(self.dtype):
            arr = widen_bfloat16(arr)
        return _as_requested(arr, dtype, copy)

    def release(self) -> None:
        self.storage.file.release(self.storage.key)

    def __repr__(self) -> str:
        return f"StoredArray(shape={self.shape}, dtype={self.dtype})"


def _describe(obj) -> str:
    if type(obj) is Storage:
        return "a storage of another file"
    cls = obj if isinstance(obj, type) else type(obj)
    return f"a {cls.__module__}.{cls.__qualname__}"


def _int_tuple(values, path, what: str, tensor) -> tuple[int, ...]:
    if type(values) is tuple and len(values) <= MAX_DIMS and all(type(v) is int for v in values) \
            and (what != "shape" or all(v >= 0 for v in values)):
        return values   # the common case, a tuple of plain ints, as it is (a few times faster)
    try:
        items = tuple(values)
    except TypeError:
        raise ScanError(path, f"tensor {what} {values!r} is not a sequence", tensor=tensor) from None
    if len(items) > MAX_DIMS:
        raise ScanError(path, f"tensor {what} has {len(items)} dimensions (at most {MAX_DIMS})", tensor=tensor)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise ScanError(path, f"tensor {what} {items!r} is not all integers", tensor=tensor)
    if what == "shape" and any(v < 0 for v in items):
        raise ScanError(path, f"tensor shape {items} has a negative size", tensor=tensor)
    return tuple(int(v) for v in items)


def _check_view(storage: Storage, offset: int, shape, stride, dtype, path, tensor) -> None:
    """Every addressable element of the view must lie in the storage (Python ints: no overflow)."""
    if len(stride) != len(shape):
        raise ScanError(path, f"tensor has {len(shape)} sizes but {len(stride)} strides", tensor=tensor)
    if offset < 0:
        raise ScanError(path, f"negative storage offset {offset}", tensor=tensor)
    size = math.prod(shape)
    if size == 0:
        return
    if itemsize(dtype) != itemsize(storage.dtype) and storage.dtype != np.uint8:
        raise ScanError(path, f"tensor of {dtype} over a storage of {storage.dtype}", tensor=tensor)
    numel = storage.nbytes // itemsize(dtype)
    low = offset + sum((n - 1) * s for n, s in zip(shape, stride) if s < 0)
    high = offset + sum((n - 1) * s for n, s in zip(shape, stride) if s > 0)
    if low < 0 or high >= numel:
        raise ScanError(path, f"tensor view (elements {low}..{high}) lies outside its storage of "
                              f"{numel} elements", tensor=tensor)
    if size > max(numel, MAX_REPEATED_ELEMENTS):
        raise ScanError(path, f"tensor of {size} elements over a storage of {numel} repeats storage "
                              f"elements beyond the limit of {MAX_REPEATED_ELEMENTS}", tensor=tensor)


@functools.lru_cache(maxsize=4096)   # a run's rounds repeat the same few shapes
def contiguous_strides(shape: tuple[int, ...], fortran: bool = False) -> tuple[int, ...]:
    """Element strides of a C-ordered (or, with `fortran`, Fortran-ordered) array of `shape`."""
    if fortran:
        return tuple(reversed(contiguous_strides(tuple(reversed(shape)))))
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


class LoadedArray(Frozen):
    """An array read on demand by a callback (formats that cannot be memory-mapped)."""

    __slots__ = ("shape", "dtype", "_load")

    def __init__(self, shape, dtype, load):
        self._init(shape=tuple(shape), dtype=dtype, _load=load)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def __array__(self, dtype=None, copy=None):
        return _as_requested(self._load(), dtype, copy)

    def release(self) -> None:
        pass


def _as_requested(arr: np.ndarray, dtype, copy) -> np.ndarray:
    """numpy's __array__ protocol: copy=True must give a fresh (writable) array."""
    if dtype is not None and np.dtype(dtype) != arr.dtype:
        return arr.astype(dtype)
    return arr.copy() if copy else arr


ROW_LIMIT = 1 << 18   # elements of a row read whole when a flat range is asked for (one reduce chunk)


MAX_BAND_BYTES = 1 << 30   # one band of compressed chunks held at once; past it a dataset is refused


class ChunkedArray(Frozen):
    """An array read in slices on demand (HDF5 datasets, zarr arrays). It indexes as its own flattened
    form: `a[start:stop]` reads that range of the flattened array, at most two partial rows more, so the
    reducer's memory stays bounded whatever the declared size; `np.asarray()` reads it whole.
    `read(index)` reads an N-d numpy index.

    A compressed array is decompressed a whole chunk at a time, whatever slice is asked for: read in
    slices, a chunk larger than a slice would be decompressed again for every slice of it. Such an
    array (`chunk_rows`: its chunks' extent along the first axis) is read in bands of whole chunks
    along the first axis, one band kept until the reducer moves past it, so each chunk is
    decompressed once."""

    __slots__ = ("shape", "dtype", "_read", "_chunk_rows", "_band")

    def __init__(self, shape, dtype, read, chunk_rows: int | None = None):
        self._init(shape=tuple(shape), dtype=np.dtype(dtype), _read=read, _chunk_rows=chunk_rows, _band=[None, None])

    @staticmethod
    def band_bytes(shape, dtype, chunk_rows: int) -> int:
        """Bytes of one band: `chunk_rows` rows of the first axis, all of the others."""
        return min(chunk_rows, shape[0] if shape else 1) * math.prod(shape[1:]) * np.dtype(dtype).itemsize

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def __getitem__(self, flat: slice) -> np.ndarray:
        start, stop, step = flat.indices(self.size)
        if step != 1:
            raise ValueError("ChunkedArray reads contiguous flat ranges only")
        if stop <= start:
            return np.zeros(0, dtype=self.dtype)
        if not self.shape:
            return np.asarray(self._read(()), dtype=self.dtype).reshape(-1)[start:stop]
        if self._chunk_rows:
            return self._from_bands(start, stop)
        return self._flat(tuple(), self.shape, start, stop)

    def _from_bands(self, start: int, stop: int) -> np.ndarray:
        per_band = self._chunk_rows * math.prod(self.shape[1:])
        parts = []
        for band in range(start // per_band, (stop - 1) // per_band + 1):
            if self._band[0] != band:
                self.release()   # the last band goes before the next is read
                rows = slice(band * self._chunk_rows, min((band + 1) * self._chunk_rows, self.shape[0]))
                held = BUDGET.take(self.band_bytes(self.shape, self.dtype, self._chunk_rows), None,
                                   "a band of compressed chunks")
                try:
                    self._band[:] = [band, np.asarray(self._read((rows,))).reshape(-1), held]
                except BaseException:
                    held.release()
                    raise
            offset = band * per_band
            parts.append(self._band[1][max(start, offset) - offset:min(stop, offset + per_band) - offset])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _flat(self, prefix: tuple, shape: tuple, start: int, stop: int) -> np.ndarray:
        if len(shape) == 1:
            return np.asarray(self._read(prefix + (slice(start, stop),))).reshape(-1)
        inner = math.prod(shape[1:])
        first, last = start // inner, -(-stop // inner)
        if inner <= ROW_LIMIT:   # whole rows, cut to the range
            rows = np.asarray(self._read(prefix + (slice(first, last),))).reshape(-1)
            return rows[start - first * inner:stop - first * inner]
        return np.concatenate([self._flat(prefix + (r,), shape[1:], max(start, r * inner) - r * inner,
                                          min(stop, (r + 1) * inner) - r * inner) for r in range(first, last)])

    def __array__(self, dtype=None, copy=None):
        return _as_requested(np.asarray(self._read(())).reshape(self.shape), dtype, copy)

    def release(self) -> None:
        if len(self._band) > 2:
            self._band.pop().release()
        self._band[:] = [None, None]

    def __repr__(self) -> str:
        return f"ChunkedArray(shape={self.shape}, dtype={self.dtype})"


class StreamedArray(ChunkedArray):
    """An array read forward through a byte stream (a compressed zip member), chunk by chunk as the
    reducer asks for flat ranges in order: memory stays one chunk whatever the array inflates to.
    `open()` gives a binary file positioned at the array's first byte; `finish(f)` checks the
    stream's end (a zip member's CRC-32 is checked when it is read to its end). A range before
    the stream's position reopens it."""

    __slots__ = ("_open", "_finish", "_stream")

    def __init__(self, shape, dtype, open, finish):
        super().__init__(shape, dtype, None)
        object.__setattr__(self, "_open", open)
        object.__setattr__(self, "_finish", finish)
        object.__setattr__(self, "_stream", [None, 0])   # (file, elements read)

    def __getitem__(self, flat: slice) -> np.ndarray:
        start, stop, step = flat.indices(self.size)
        if step != 1:
            raise ValueError("StreamedArray reads contiguous flat ranges only")
        f, at = self._stream
        if f is None or start < at:
            self.release()
            f, at = self._open(), 0
        item = self.dtype.itemsize
        if start > at:
            self._exactly(f, (start - at) * item)
        out = np.frombuffer(self._exactly(f, (stop - start) * item), dtype=self.dtype) if stop > start else \
            np.zeros(0, self.dtype)
        self._stream[:] = [f, max(stop, start)]
        if stop == self.size:
            self._finish(f)
        return out

    @staticmethod
    def _exactly(f, n: int) -> bytes:
        data = f.read(n)
        if len(data) != n:
            raise EOFError(f"the stream ends {n - len(data)} bytes early")
        return data

    def __array__(self, dtype=None, copy=None):
        arr = self[0:self.size].reshape(self.shape)
        self.release()
        return _as_requested(arr, dtype, copy)

    def release(self) -> None:
        f = self._stream[0]
        self._stream[:] = [None, 0]
        if f is not None:
            f.close()
