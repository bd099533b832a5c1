"""Read `torch.save` files (zip and pre-1.6 legacy) without torch and without running their code.

Tensors come back as `StoredArray`s: lazy views into a memory map of the file, so opening a
checkpoint costs only its (small) pickle, and each tensor's bytes are touched when reduced.
Whole pickled modules (`torch.save(model)`) load too; their classes become inert stubs and
`module_state_dict()` walks `_parameters`, `_buffers` and `_modules` to recover the tensors.
"""

from __future__ import annotations

import os
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from flowscan.errors import ScanError
from flowscan.io.arrays import BFLOAT16, Region, Storage, StoredArray, itemsize, map_file
from flowscan.io.safe_pickle import Stub, _Refused, safe_load

TORCH_SUFFIXES = (".pt", ".pth", ".pth.tar", ".bin", ".ckpt", ".tar")

_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32), "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": BFLOAT16,
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16), "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _StorageType:
    """Stand-in for torch.FloatStorage & co.: carries only the element dtype."""

    def __init__(self, dtype):
        self.dtype = dtype


def _rebuild_tensor(storage: Storage, storage_offset, size, stride, *unused):
    return StoredArray(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args)


def _dtype_name(name: str):
    return f"torch.{name}"


def _torch_allowed() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch", "Size"): tuple,
        ("torch", "device"): lambda *a: ":".join(str(x) for x in a),
        ("torch.nn.parameter", "Parameter"): _rebuild_parameter,
    }
    for name, dtype in _STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(dtype)
    for name in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16",
                 "int8", "uint8", "bool"):
        allowed[("torch", name)] = _dtype_name(name)
    return allowed


_ALLOWED = _torch_allowed()


def is_torch_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith(TORCH_SUFFIXES)


def load(path: Path) -> Any:
    """The object a torch.save file holds, with tensors as lazy `StoredArray`s."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ScanError(path, f"cannot open: {exc.strerror or exc}") from None
    if size == 0:
        raise ScanError(path, "file is empty")
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path)
        return _load_legacy(path)
    except ScanError:
        raise
    except _Refused as exc:  # pragma: no cover - safe_load converts these
        raise ScanError(path, f"refused to unpickle {exc}") from None
    except (zipfile.BadZipFile, EOFError, struct.error, ValueError, OSError, IndexError,
            KeyError, TypeError, AttributeError, __import__("pickle").UnpicklingError) as exc:
        raise ScanError(path, f"not a readable torch checkpoint (truncated or corrupt?): "
                              f"{type(exc).__name__}: {exc}") from None


def _load_zip(path: Path) -> Any:
    mm = map_file(path)
    with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
        pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
        if not pkl:
            raise ScanError(path, "zip archive without data.pkl: not a torch.save file")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder = prefix + "byteorder"
        if byteorder in zf.namelist() and zf.read(byteorder).strip() == b"big":
            raise ScanError(path, "big-endian torch files are not supported")
        infos = {info.filename: info for info in zf.infolist()}

        def persistent_load(pid):
            kind, storage_type, key, _location, numel = pid[:5]
            if kind != "storage":
                raise ScanError(path, f"unknown persistent id kind {kind!r}")
            dtype = _storage_dtype(path, storage_type)
            info = infos.get(f"{prefix}data/{key}")
            if info is None:
                raise ScanError(path, f"storage {key} is missing from the archive")
            if info.compress_type != zipfile.ZIP_STORED:
                raise ScanError(path, f"storage {key} is compressed; torch never writes that")
            nbytes = int(numel) * itemsize(dtype)
            offset = _zip_data_offset(raw.fileno(), info)
            if offset + nbytes > len(mm) or info.file_size < nbytes:
                raise ScanError(path, f"storage {key} extends past the end of the file (truncated?)")
            return Storage(dtype, int(numel), Region(mm, path, offset, nbytes))

        with zf.open(pkl[0]) as f:
            return safe_load(f, str(path), allowed=_ALLOWED, persistent_load=persistent_load)


def _zip_data_offset(fd: int, info: zipfile.ZipInfo) -> int:
    # pread, not the memory map: touching a page of the map pulls its neighbours into memory
    # too, and a checkpoint has a header before every storage
    header = os.pread(fd, 30, info.header_offset)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise ValueError("bad local zip header")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _storage_dtype(path: Path, storage_type) -> object:
    if isinstance(storage_type, _StorageType):
        return storage_type.dtype
    name = getattr(type(storage_type), "__qualname__", None) or repr(storage_type)
    raise ScanError(path, f"unsupported tensor storage type {name}")


def _load_legacy(path: Path) -> Any:
    """Pre-1.6 format: magic, protocol, sys_info pickles, the object, the storage keys, then data."""
    with open(path, "rb") as f:
        magic = safe_load(f, str(path))
        if magic != _LEGACY_MAGIC:
            raise ScanError(path, "not a torch checkpoint (neither a zip archive nor a legacy "
                                  "torch file; truncated or corrupt?)")
        safe_load(f, str(path))  # protocol version
        safe_load(f, str(path))  # sys_info
        storages: dict[str, Storage] = {}

        def persistent_load(pid):
            kind = pid[0]
            if kind == "module":  # ('module', cls, file, source): keep the (stub) class only
                return pid[1]
            _kind, storage_type, root_key, _location, numel, view_metadata = pid
            dtype = _storage_dtype(path, storage_type)
            root = storages.setdefault(root_key, Storage(dtype, int(numel)))
            if view_metadata is not None:
                view_key, offset, view_size = view_metadata
                return _StorageView(root, int(offset), int(view_size))
            return root

        obj = safe_load(f, str(path), allowed={**_ALLOWED, ("torch._utils", "_rebuild_tensor"): _rebuild_legacy,
                                                 ("torch._utils", "_rebuild_tensor_v2"): _rebuild_legacy},
                        persistent_load=persistent_load)
        keys = safe_load(f, str(path))
        offset = f.tell()
    mm = map_file(path)
    for key in keys:
        storage = storages[key]
        numel = struct.unpack_from("<q", mm, offset)[0]
        nbytes = numel * itemsize(storage.dtype)
        if offset + 8 + nbytes > len(mm):
            raise ScanError(path, f"storage {key} extends past the end of the file (truncated?)")
        storage.numel = numel
        storage.region = Region(mm, path, offset + 8, nbytes)
        offset += 8 + nbytes
    return obj


class _StorageView:
    def __init__(self, root: Storage, offset: int, size: int):
        self.root, self.offset, self.size = root, offset, size


def _rebuild_legacy(storage, storage_offset, size, stride, *unused):
    if isinstance(storage, _StorageView):
        return StoredArray(storage.root, storage.offset + storage_offset, tuple(size), tuple(stride))
    return StoredArray(storage, storage_offset, tuple(size), tuple(stride))


def module_state_dict(obj: Any, prefix: str = "") -> "OrderedDict[str, Any]":
    """State dict of a pickled nn.Module (a stub tree): parameters and buffers by dotted name."""
    out: OrderedDict[str, Any] = OrderedDict()
    state = obj.__dict__
    for attr in ("_parameters", "_buffers"):
        for name, value in (state.get(attr) or {}).items():
            if value is not None:
                out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, Stub):
            out.update(module_state_dict(child, f"{prefix}{name}."))
    return out


def is_module(obj: Any) -> bool:
    return isinstance(obj, Stub) and "_parameters" in obj.__dict__
