"""numpy .npz archives without pickle: stored members are memory-mapped, compressed ones inflated.

`np.savez` stores members uncompressed: they become zero-copy `StoredArray`s whose zip CRC-32
the reducer checks as it reads them. `np.savez_compressed` members are streamed through the
inflater chunk by chunk as they are reduced (`StreamedArray`; zipfile checks their CRC-32 at the
end), so a small file that inflates to gigabytes costs a chunk of memory; a Fortran-order member is
inflated whole, within the analysis's memory budget (io/budget.py). Object arrays need pickle and
are refused.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np

from flowscan.errors import ScanError
from flowscan.io.arrays import LoadedArray, Storage, StorageFile, StoredArray, StreamedArray, contiguous_strides
from flowscan.io.budget import BUDGET
from flowscan.io.location import location, map_file
from flowscan.io.zip_members import data_offset, unique_members

_NPY_MAGIC = b"\x93NUMPY"


def load(path: Path) -> dict[str, StoredArray | LoadedArray]:
    path = location(path)
    raw = path.open("rb")   # one handle for the zip and the members' headers
    try:
        zf = zipfile.ZipFile(raw)
    except Exception as exc:  # noqa: BLE001 - BadZipFile, NotImplementedError, OSError ...
        raw.close()
        raise ScanError(path, f"not a readable .npz archive (truncated or corrupt?): "
                              f"{type(exc).__name__}: {exc}", truncated=True) from None
    with raw, zf:
        members = list(unique_members(path, zf).values())
        odd = [i.filename for i in members if not i.filename.endswith(".npy")]
        if odd:  # numpy writes only NAME.npy members; anything else is damage or a different file
            raise ScanError(path, f"member {odd[0]!r} is not a .npy array (a damaged or foreign archive)")
        storages = StorageFile(path, map_file(path))
        out: dict[str, StoredArray | LoadedArray] = {}
        for info in members:
            name = info.filename[:-4]
            try:
                array = _member(path, zf, raw, info, storages, name)
            except ScanError as exc:
                raise ScanError(exc.path or path, exc.message, exc.tensor or name) from None
            except Exception as exc:  # noqa: BLE001 - zipfile and numpy raise many kinds
                raise ScanError(path, f"unreadable array member: {type(exc).__name__}: {exc}",
                                tensor=name) from None
            if array is not None:
                out[name] = array
    return out


def _member(path, zf, raw, info, storages: StorageFile, name: str):
    with zf.open(info) as f:
        if f.read(6) != _NPY_MAGIC:
            raise ScanError(path, "member is not a .npy array", tensor=name)
        f.seek(0)
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise ScanError(path, f"unknown .npy version {version}", tensor=name)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        header_len = f.tell()
    if not all(type(n) is int and n >= 0 for n in shape):
        raise ScanError(path, f".npy header gives shape {shape}: not non-negative integers", tensor=name)
    if dtype.hasobject:
        raise ScanError(path, "object arrays need pickle; refused", tensor=name)
    if dtype.kind not in "biufc" or dtype.itemsize == 0:
        return None   # strings and records are not weights
    nbytes = math.prod(shape) * dtype.itemsize
    if header_len + nbytes != info.file_size:
        raise ScanError(path, f"array of shape {shape} needs {nbytes} bytes but its member holds "
                              f"{info.file_size - header_len} (truncated or corrupt?)", tensor=name)
    stride = contiguous_strides(shape, fortran=bool(fortran))
    if info.compress_type == zipfile.ZIP_STORED:
        start = data_offset(raw, info, path)
        storages.set_region(name, start + header_len, nbytes, info.CRC, crc_prefix=header_len)
        storage = Storage(dtype, nbytes // dtype.itemsize if dtype.itemsize else 0, storages, name)
        return StoredArray(storage, 0, shape, stride, owner=storages, tensor=name)
    if not fortran:   # streamed chunk by chunk: no memory but a chunk's
        return StreamedArray(shape, dtype, _opener(path, info.filename, header_len, name),
                             _end_check(path, name))
    if nbytes > BUDGET.total:
        raise ScanError(path, f"compressed array inflates to {nbytes} bytes, more than flowscan's memory "
                              f"budget of {BUDGET.total} (refused)", tensor=name)
    return LoadedArray(shape, dtype, _inflater(path, info.filename, header_len, nbytes, shape,
                                               dtype, bool(fortran), name))


def _opener(path: Path, member: str, header_len: int, name: str):
    def open_stream():
        try:
            raw = path.open("rb")
            zf = zipfile.ZipFile(raw)
            f = zf.open(member)
            f.read(header_len)
        except Exception as exc:  # noqa: BLE001 - as in _inflater
            raise ScanError(path, f"cannot inflate array: {type(exc).__name__}: {exc}", tensor=name) from None
        return _Stream(f, (zf, raw), path, name)
    return open_stream


class _Stream:
    """A member's inflating reader that closes its archive with it and names its file in errors."""

    def __init__(self, f, owners, path, name):
        self.f, self.owners, self.path, self.name = f, owners, path, name

    def read(self, n: int = -1) -> bytes:
        try:
            return self.f.read(n)
        except Exception as exc:  # noqa: BLE001 - BadZipFile (CRC), zlib.error, OSError ...
            raise ScanError(self.path, f"cannot inflate array: {type(exc).__name__}: {exc}",
                            tensor=self.name) from None

    def close(self) -> None:
        for owner in (self.f, *self.owners):
            owner.close()


def _end_check(path: Path, name: str):
    def finish(stream: _Stream) -> None:
        if stream.read(1):   # reading to the end makes zipfile check the CRC
            raise ScanError(path, "compressed member is longer than its header says", tensor=name)
    return finish


def _inflater(path: Path, member: str, header_len: int, nbytes: int, shape, dtype, fortran, name):
    def inflate() -> np.ndarray:
        held = BUDGET.take(nbytes, path, "inflating a compressed Fortran-order array", tensor=name)
        out = np.empty(nbytes, dtype=np.uint8)
        held.tie(out)
        try:
            with path.open("rb") as raw, zipfile.ZipFile(raw) as zf, zf.open(member) as f:
                f.read(header_len)
                view, got = memoryview(out), 0
                while got < nbytes:
                    n = f.readinto(view[got:]) if hasattr(f, "readinto") else 0
                    if not n:
                        break
                    got += n
                if got != nbytes or f.read(1):  # reading to the end makes zipfile check the CRC
                    raise ScanError(path, "compressed member is truncated or longer than its header says",
                                    tensor=name)
        except ScanError:
            raise
        except Exception as exc:  # noqa: BLE001 - BadZipFile (CRC), zlib.error, OSError ...
            raise ScanError(path, f"cannot inflate array: {type(exc).__name__}: {exc}", tensor=name) from None
        return out.view(dtype).reshape(shape, order="F" if fortran else "C")
    return inflate
