"""Memory-mapped safetensors reading with numpy only (the format is a JSON header + raw bytes).

Every header field is validated before any byte is read: a malformed header is a named error
of its file, never a KeyError or a read outside the data section.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

from flowscan.errors import ScanError
from flowscan.io.arrays import BFLOAT16, Storage, StorageFile, StoredArray, itemsize
from flowscan.io.location import location, map_file

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": BFLOAT16, "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_), "C64": np.dtype(np.complex64),
}
MAX_HEADER_BYTES = 100_000_000   # the safetensors library's own limit


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"name {key!r} appears twice in the header")
        out[key] = value
    return out


def read_header(path: Path) -> tuple[dict, dict, int]:
    """(tensor entries, __metadata__, start of the data section) of a safetensors file."""
    path = location(path)
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ScanError(path, "not a safetensors file: shorter than its 8-byte header size")
            (n,) = struct.unpack("<Q", raw)
            size = path.stat().st_size
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise ScanError(path, f"header of {n} bytes does not fit in a {size}-byte file "
                                      f"(truncated, not safetensors, or over {MAX_HEADER_BYTES} bytes)", truncated=True)
            header = json.loads(f.read(n), object_pairs_hook=_no_duplicates)
    except ScanError:
        raise
    except RecursionError:
        raise ScanError(path, "safetensors header nests too deeply") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ScanError(path, f"unreadable safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise ScanError(path, "safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise ScanError(path, "safetensors __metadata__ is not a JSON object")
    return header, meta, 8 + n


def _entry(path: Path, name: str, info, data_size: int) -> tuple[object, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, every field checked."""
    if not isinstance(info, dict):
        raise ScanError(path, "header entry is not a JSON object", tensor=name)
    for field in ("dtype", "shape", "data_offsets"):
        if field not in info:
            raise ScanError(path, f"header entry has no {field!r}", tensor=name)
    code = info["dtype"]
    if not isinstance(code, str) or code not in _DTYPES:
        raise ScanError(path, f"unsupported dtype {code!r} (flowscan reads "
                              f"{', '.join(_DTYPES)})", tensor=name)
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(type(v) is int and v >= 0 for v in shape):
        raise ScanError(path, f"shape {shape!r} is not a list of non-negative integers", tensor=name)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(v) is int for v in offsets)):
        raise ScanError(path, f"data_offsets {offsets!r} is not a pair of integers", tensor=name)
    begin, end = offsets
    dtype = _DTYPES[code]
    numel = math.prod(shape)
    if not 0 <= begin <= end or end - begin != numel * itemsize(dtype):
        raise ScanError(path, f"byte range {begin}..{end} does not match shape {tuple(shape)} of {code}",
                        tensor=name)
    if end > data_size:
        raise ScanError(path, "data extends past the end of the file (truncated?)", tensor=name,
                        truncated=True)
    return dtype, tuple(shape), begin, end


def load(path: Path) -> tuple[dict[str, StoredArray], dict]:
    """Lazy arrays by name (file order) and the file's metadata."""
    path = location(path)
    header, meta, start = read_header(path)
    size = path.stat().st_size
    entries = {str(name): _entry(path, str(name), info, size - start) for name, info in header.items()}
    file = StorageFile(path, map_file(path) if size > start else None)
    out: dict[str, StoredArray] = {}
    for name, (dtype, shape, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2]):
        file.set_region(name, start + begin, end - begin)
        storage = Storage(dtype, (end - begin) // itemsize(dtype), file, name)
        out[name] = StoredArray.whole(storage, shape, owner=file, tensor=name)
    return out, meta
