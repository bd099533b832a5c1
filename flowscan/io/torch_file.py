"""Read `torch.save` files (zip and pre-1.6 legacy) without torch and without running their code.

Tensors come back as `StoredArray`s: lazy views into a memory map of the file, so opening a
checkpoint costs only its (small) pickle, and each tensor's bytes are touched when reduced.
Tensor rebuilders accept only storages this module registered for this file (`StorageFile`),
and every view is bounds-checked; zip members keep their CRC-32 for the reducer to verify.
Whole pickled modules (`torch.save(model)`) load too; their classes become inert stubs and
`module_state_dict()` walks `_parameters`, `_buffers` and `_modules` to recover the tensors.
"""

from __future__ import annotations

import io
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from flowscan.errors import ScanError, UnsafePickleError
from flowscan.io.location import location, map_file, read_at
from flowscan.io.zip_members import data_offsets, unique_members
from flowscan.io.arrays import BFLOAT16, Frozen, Storage, StorageFile, StoredArray
from flowscan.io.safe_pickle import (MAX_PICKLE_BYTES, Allowed, Stub, Token, _Rejected, safe_load,
                                     stub_state)

TORCH_SUFFIXES = (".pt", ".pth", ".pth.tar", ".bin", ".ckpt", ".tar")
MAX_TENSORS = 1 << 17   # per file; real models have thousands, a flood of tiny ones is an attack

_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32), "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": BFLOAT16,
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16), "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64), "ComplexDoubleStorage": np.dtype(np.complex128),
    "UntypedStorage": np.dtype(np.uint8),   # torch >= 2: bytes, typed by the rebuild's dtype
}
# torch dtypes with an exact numpy equivalent (as named in pickles: torch.float32 ...)
_TORCH_DTYPES = {
    "float32": np.dtype(np.float32), "float64": np.dtype(np.float64), "float16": np.dtype(np.float16),
    "bfloat16": BFLOAT16, "int64": np.dtype(np.int64), "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16), "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16), "uint32": np.dtype(np.uint32), "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_), "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
}
# torch dtypes that exist but have no exact numpy form: named in the refusal
_UNSUPPORTED_DTYPES = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                       "float8_e8m0fnu", "float4_e2m1fn_x2", "complex32", "qint8", "quint8",
                       "qint32", "quint4x2", "quint2x4", "bits8", "bits16", "bits1x8", "bits2x4",
                       "bits4x2", "uint1", "uint2", "uint3", "uint4", "uint5", "uint6", "uint7",
                       "int1", "int2", "int3", "int4", "int5", "int6", "int7")
_UNSUPPORTED_REBUILDS = {
    "_rebuild_qtensor": "quantized tensors", "_rebuild_sparse_tensor": "sparse tensors",
    "_rebuild_sparse_csr_tensor": "sparse tensors", "_rebuild_nested_tensor": "nested tensors",
    "_rebuild_meta_tensor_no_storage": "meta tensors (no data)",
    "_rebuild_wrapper_subclass": "tensor subclasses without storage",
    "_rebuild_device_tensor_from_numpy": "device tensors", "_rebuild_xla_tensor": "XLA tensors",
    "_rebuild_mtia_tensor": "MTIA tensors", "_rebuild_device_tensor_from_cpu_tensor": "device tensors",
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# element sizes of the storage types flowscan cannot read, so a legacy file's other storages still are
_UNSUPPORTED_STORAGE_BYTES = {"QInt8Storage": 1, "QUInt8Storage": 1, "QInt32Storage": 4, "QUInt4x2Storage": 1,
                              "QUInt2x4Storage": 1, "ComplexHalfStorage": 4}


class UnreadableTensor(Stub):
    """A tensor flowscan cannot read exactly (quantized, sparse, float8 ...): why, not its data."""

    __slots__ = ()

    def __repr__(self):
        return f"<unreadable tensor: {self._stub.state}>"

    @property
    def reason(self) -> str:
        return str(self._stub.state)


def _unreadable(reason: str) -> UnreadableTensor:
    obj = UnreadableTensor.__new__(UnreadableTensor)
    obj.__setstate__(reason)
    return obj


class _FileReader:
    """The per-file allow-list: fresh stand-ins whose rebuilders accept only this file's storages."""

    def __init__(self, path: Path, storages: StorageFile):
        self.path, self.storages, self.n_tensors = path, storages, 0

    def allowed(self) -> dict[tuple[str, str], Any]:
        """The names a torch pickle may use: the immutable ones shared by every file, and the
        rebuilders bound to this file's storages."""
        allowed = dict(_shared_allowed())
        for key, fn in {("torch._utils", "_rebuild_tensor"): self.rebuild,
                        ("torch._utils", "_rebuild_tensor_v2"): self.rebuild,
                        ("torch._utils", "_rebuild_tensor_v3"): self.rebuild_v3}.items():
            allowed[key] = Allowed(".".join(key), fn)
        return allowed

    def _count(self) -> None:
        self.n_tensors += 1
        if self.n_tensors > MAX_TENSORS:
            raise ScanError(self.path, f"more than {MAX_TENSORS} tensors in one file (refused as a "
                                       "resource attack)")

    def rebuild(self, storage, storage_offset, size, stride, *unused):
        self._count()
        if isinstance(storage, UnreadableTensor):
            return storage
        return StoredArray(storage, storage_offset, size, stride, owner=self.storages)

    def rebuild_v3(self, storage, storage_offset, size, stride, requires_grad, hooks, dtype, *unused):
        self._count()
        if not isinstance(dtype, Token):
            raise ScanError(self.path, f"tensor dtype {dtype!r} is not a torch dtype")
        if dtype.value is None:
            return _unreadable(f"dtype {dtype._name} has no exact numpy equivalent")
        if isinstance(storage, UnreadableTensor):
            return storage
        return StoredArray(storage, storage_offset, size, stride, owner=self.storages, dtype=dtype.value)

    def storage_dtype(self, storage_type) -> object | None:
        """The element dtype of a storage type, or None when flowscan cannot read it."""
        if isinstance(storage_type, Token) and storage_type.value is not None:
            return storage_type.value
        return None


_SHARED_ALLOWED: dict[tuple[str, str], Any] = {}


def _shared_allowed() -> dict[tuple[str, str], Any]:
    """Torch's allow-listed names that do not depend on the file (immutable stand-ins), built once."""
    if _SHARED_ALLOWED:
        return _SHARED_ALLOWED
    allowed: dict[tuple[str, str], Any] = {}
    for module in ("torch._utils", "torch._tensor"):
        for name, reason in _UNSUPPORTED_REBUILDS.items():
            allowed[(module, name)] = Allowed(f"{module}.{name}", _refuse_kind(reason))
    functions = {
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch._tensor", "_rebuild_from_type"): _rebuild_from_type,
        ("torch.nn.parameter", "Parameter"): _rebuild_parameter,
        ("torch", "Size"): lambda *a: tuple(*a),
        ("torch", "device"): lambda *a: ":".join(str(x) for x in a),
        # how torch pickles a layout (torch.sparse_coo ...): its name; the sparse rebuild is refused by kind
        ("torch.serialization", "_get_layout"): lambda name: str(name),
    }
    for key, fn in functions.items():
        allowed[key] = Allowed(".".join(key), fn)
    for name, dtype in _STORAGE_DTYPES.items():
        allowed[("torch", name)] = Token(f"torch.{name}", dtype)
        allowed[("torch.storage", name)] = Token(f"torch.storage.{name}", dtype)
    for name, dtype in _TORCH_DTYPES.items():
        allowed[("torch", name)] = Token(f"torch.{name}", dtype)
    for name in _UNSUPPORTED_DTYPES:
        allowed[("torch", name)] = Token(f"torch.{name}", None)
    _SHARED_ALLOWED.update(allowed)
    return _SHARED_ALLOWED


def _type_name(obj) -> str:
    if isinstance(obj, Allowed):
        return obj._name
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _refuse_kind(reason: str):
    def rebuild(*args, **kwargs):
        return _unreadable(f"{reason} are not supported")
    return rebuild


def _rebuild_parameter(data, *unused):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args)


def _rebuild_from_type(func, new_type, args, state):
    return func(*args)


def is_torch_file(path: Path) -> bool:
    return path.name.lower().endswith(TORCH_SUFFIXES) and path.is_file()   # the name first: no stat


def load(path: Path, notes: list[str] | None = None) -> Any:
    """The object a torch.save file holds, with tensors as lazy `StoredArray`s.

    Calls a pickle asked for that were recorded instead of run are appended to `notes`."""
    path = location(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ScanError(path, f"cannot open: {exc.strerror or exc}") from None
    if size == 0:
        raise ScanError(path, "file is empty")
    try:
        with path.open("rb") as raw:   # one handle for the zip test, the zip and its headers
            loaded = _load_zip(path, raw) if zipfile.is_zipfile(raw) else _load_legacy(path)
    except ScanError:
        raise
    except _Rejected as exc:
        raise ScanError(path, f"refused: {exc}") from None
    except RecursionError:
        raise ScanError(path, "nested too deeply to read") from None
    except MemoryError:
        raise ScanError(path, "needs more memory than this machine has (refused)") from None
    except Exception as exc:  # noqa: BLE001 - whatever else breaks, it is this file's fault
        raise ScanError(path, f"not a readable torch checkpoint (truncated or corrupt?): "
                              f"{type(exc).__name__}: {exc}", truncated=True) from None
    if notes is not None and loaded.note():
        notes.append(f"{path.parent.name}/{path.name}: {loaded.note()}")
    return loaded.value


def _load_zip(path: Path, raw):
    with zipfile.ZipFile(raw) as zf:
        infos = unique_members(path, zf)
        names = list(infos)
        pkl = [n for n in names if n.endswith("data.pkl")]
        if not pkl:
            raise ScanError(path, "zip archive without data.pkl: not a torch.save file")
        if len(pkl) > 1:   # a scanner may check one and a loader read the other
            raise ScanError(path, f"zip archive holds {len(pkl)} data.pkl members ({pkl[0]}, {pkl[1]}): "
                                  "which one is meant? (refused)")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder = prefix + "byteorder"
        if byteorder in names and zf.read(byteorder).strip() == b"big":
            raise ScanError(path, "big-endian torch files are not supported")
        storages = StorageFile(path, map_file(path))
        reader = _FileReader(path, storages)
        made: dict[str, Storage] = {}
        offsets: dict[str, int] = {}
        data_prefix = f"{prefix}data/"

        def persistent_load(pid):
            if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
                raise ScanError(path, f"unknown persistent id {_short(pid)}")
            _kind, storage_type, key, _location, numel = pid[:5]
            key = str(key)
            dtype = reader.storage_dtype(storage_type)
            if dtype is None:
                return _unreadable(f"storage type {_type_name(storage_type)} is not supported")
            if key in made:  # a storage shared by several tensors
                if made[key].dtype != dtype or made[key].numel != numel:
                    raise ScanError(path, f"storage {key} is declared twice with different types or sizes")
                return made[key]
            info = infos.get(f"{data_prefix}{key}")
            if info is None:
                raise ScanError(path, f"storage {key} is missing from the archive")
            if info.compress_type != zipfile.ZIP_STORED:
                raise ScanError(path, f"storage {key} is compressed; torch never writes that")
            storage = Storage(dtype, numel, storages, key)
            if info.file_size < storage.nbytes:
                raise ScanError(path, f"storage {key} claims {storage.nbytes} bytes but its archive "
                                      f"member holds {info.file_size}")
            if not offsets:   # every storage member's header at once: one batch from a store
                offsets.update(data_offsets(raw, [i for n, i in infos.items() if n.startswith(data_prefix)], path))
            storages.set_region(key, offsets[info.filename], info.file_size, info.CRC)
            made[key] = storage
            return storage

        info = zf.getinfo(pkl[0])
        if info.file_size > MAX_PICKLE_BYTES:
            raise ScanError(path, f"data.pkl claims {info.file_size} bytes: refused (tensors are stored "
                                  "outside the pickle, so a real one is far smaller)")
        with zf.open(info) as f:
            data = f.read()   # zipfile checks its CRC-32 on this full read
        stream = io.BytesIO(data)
        loaded = safe_load(stream, str(path), allowed=reader.allowed(), persistent_load=persistent_load)
        if stream.tell() != len(data):   # torch writes one pickle; more after it is hidden from a reader
            raise ScanError(path, f"data.pkl holds {len(data) - stream.tell()} bytes after its pickle (a second "
                                  "pickle stream?): refused")
        return loaded


def _short(obj) -> str:
    text = repr(obj)
    return text if len(text) < 80 else text[:77] + "..."


def _load_legacy(path: Path):
    """Pre-1.6 format: magic, protocol, sys_info pickles, the object, the storage keys, then data."""
    storages = StorageFile(path, map_file(path))
    reader = _FileReader(path, storages)
    made: dict[str, Storage] = {}
    unsupported: dict[str, tuple[str, Any]] = {}   # storages of types flowscan cannot read: skipped
    with path.open("rb") as f:
        try:
            magic = safe_load(f, str(path), max_bytes=64).value
        except ScanError:
            magic = None
        if magic != _LEGACY_MAGIC:
            _refuse_plain_pickle(f, path)
            raise ScanError(path, "not a torch checkpoint (neither a zip archive nor a legacy "
                                  "torch file; truncated or corrupt?)", truncated=True)
        safe_load(f, str(path))  # protocol version
        safe_load(f, str(path))  # sys_info

        def persistent_load(pid):
            if isinstance(pid, tuple) and pid and pid[0] == "module":
                return pid[1] if len(pid) > 1 else None  # ('module', cls, file, source): the stub class
            if not isinstance(pid, tuple) or len(pid) != 6 or pid[0] != "storage":
                raise ScanError(path, f"unknown persistent id {_short(pid)}")
            _kind, storage_type, root_key, _location, numel, view_metadata = pid
            root_key = str(root_key)
            dtype = reader.storage_dtype(storage_type)
            if dtype is None:
                unsupported[root_key] = (_type_name(storage_type), numel)
                return _unreadable(f"storage type {_type_name(storage_type)} is not supported")
            root = made.get(root_key)
            if root is None:
                root = made[root_key] = Storage(dtype, numel, storages, root_key)
            elif root.dtype != dtype or root.numel != numel:
                raise ScanError(path, f"storage {root_key} is declared twice with different types or sizes")
            if view_metadata is not None:
                _view_key, offset, view_size = view_metadata
                return _LegacyView(root, offset, view_size, path)
            return root

        allowed = reader.allowed()
        rebuild = Allowed("torch._utils._rebuild_tensor", lambda s, o, *rest: reader.rebuild(
            *_resolve_view(s, o), *rest))
        allowed[("torch._utils", "_rebuild_tensor")] = allowed[("torch._utils", "_rebuild_tensor_v2")] = rebuild
        loaded = safe_load(f, str(path), allowed=allowed, persistent_load=persistent_load)
        keys = safe_load(f, str(path)).value
        offset = f.tell()
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ScanError(path, "legacy storage key list is malformed")
    size = path.stat().st_size
    with path.open("rb") as f:
        for key in keys:
            header = read_at(f, 8, offset)
            if len(header) < 8:
                raise ScanError(path, f"storage {key} extends past the end of the file (truncated?)",
                                truncated=True)
            numel = struct.unpack("<q", header)[0]
            if key in unsupported:   # skip its bytes; a tensor over it is refused by name if it is used
                kind, declared = unsupported[key]
                item = _UNSUPPORTED_STORAGE_BYTES.get(kind.rsplit(".", 1)[-1])
                if item is None or numel != declared or numel < 0:
                    raise ScanError(path, f"storage {key} is a {kind}, which flowscan cannot read (unsupported)")
                offset += 8 + numel * item
                continue
            storage = made.get(key)
            if storage is None or numel != storage.numel:
                raise ScanError(path, f"storage {key} holds {numel} elements, but the pickle declares "
                                      f"{storage.numel if storage else 'no such storage'}")
            if offset + 8 + storage.nbytes > size:
                raise ScanError(path, f"storage {key} extends past the end of the file (truncated?)",
                                truncated=True)
            storages.set_region(key, offset + 8, storage.nbytes)
            offset += 8 + storage.nbytes
    missing = sorted(set(made) - set(keys))
    if missing:
        raise ScanError(path, f"storage {missing[0]} is used but has no data in the file")
    return loaded


def _refuse_plain_pickle(f, path: Path) -> None:
    """A file that is a plain pickle (no torch magic, e.g. protocol 0/1 under a .pt name): read it
    through the restricted unpickler only to name what it would have run, if anything."""
    f.seek(0)
    try:
        safe_load(f, str(path))
    except UnsafePickleError:
        raise
    except ScanError:
        return   # not a pickle at all: the caller says what it is not
    raise ScanError(path, "a plain pickle, not a torch checkpoint (refused: torch files carry a zip "
                          "archive or the legacy magic number)")


class _LegacyView(Frozen):
    """A legacy storage view: (root storage, element offset, element count)."""

    __slots__ = ("root", "offset", "size")

    def __init__(self, root: Storage, offset, size, path):
        if not all(isinstance(v, int) and v >= 0 for v in (offset, size)) or offset + size > root.numel:
            raise ScanError(path, f"storage view {offset}+{size} lies outside storage {root.key}")
        self._init(root=root, offset=offset, size=size)


def _resolve_view(storage, storage_offset):
    if isinstance(storage, _LegacyView):
        if not isinstance(storage_offset, int):
            return storage.root, storage_offset
        return storage.root, storage.offset + storage_offset
    return storage, storage_offset


def module_state_dict(obj: Any, prefix: str = "", kinds: tuple[str, ...] = ("_parameters", "_buffers")
                      ) -> "OrderedDict[str, Any]":
    """State dict of a pickled nn.Module (a stub tree), as `state_dict()` gives it: parameters
    and persistent buffers by dotted name (`kinds=("_parameters",)`: the parameters alone, in
    `named_parameters()` order). Walks without recursion (any depth)."""
    out: OrderedDict[str, Any] = OrderedDict()
    stack, seen = [(obj, prefix)], set()
    while stack:
        module, at = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        state = stub_state(module)
        skip = state.get("_non_persistent_buffers_set") or ()
        skip = set(skip) if isinstance(skip, (set, frozenset, list, tuple)) else set()
        for attr in kinds:
            entries = state.get(attr)
            for name, value in (entries.items() if isinstance(entries, dict) else ()):
                if value is not None and not (attr == "_buffers" and name in skip):
                    out[f"{at}{name}"] = value
        children = state.get("_modules")
        if isinstance(children, dict):
            # pushed in reverse so that children come out in definition order
            for name, child in reversed(list(children.items())):
                if isinstance(child, Stub):
                    stack.append((child, f"{at}{name}."))
    return out


def is_module(obj: Any) -> bool:
    return isinstance(obj, Stub) and not isinstance(obj, UnreadableTensor) and "_parameters" in stub_state(obj)
