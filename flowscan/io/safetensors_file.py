"""Memory-mapped safetensors reading with numpy only (the format is a JSON header + raw bytes)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from flowscan.errors import ScanError
from flowscan.io.arrays import BFLOAT16, Region, Storage, StoredArray, itemsize, map_file

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": BFLOAT16, "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


def read_header(path: Path) -> tuple[dict, dict, int]:
    """(tensor entries, __metadata__, start of the data section) of a safetensors file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ScanError(path, "not a safetensors file: shorter than its 8-byte header size")
            (n,) = struct.unpack("<Q", raw)
            size = Path(path).stat().st_size
            if n > size - 8 or n > 100_000_000:
                raise ScanError(path, f"header of {n} bytes does not fit in a {size}-byte file "
                                      "(truncated or not safetensors)")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ScanError(path, f"unreadable safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise ScanError(path, "safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    return header, meta, 8 + n


def load(path: Path) -> tuple[dict[str, StoredArray], dict]:
    """Lazy arrays by name (file order) and the file's metadata."""
    path = Path(path)
    header, meta, start = read_header(path)
    size = path.stat().st_size
    mm = map_file(path) if size > start else None
    out: dict[str, StoredArray] = {}
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ScanError(path, f"unsupported dtype {info.get('dtype')!r}", tensor=name)
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        numel = int(np.prod(shape, dtype=np.int64))
        if end - begin != numel * itemsize(dtype):
            raise ScanError(path, f"byte range {begin}..{end} does not match shape {shape}", tensor=name)
        if start + end > size:
            raise ScanError(path, "data extends past the end of the file (truncated?)", tensor=name)
        region = Region(mm, path, start + begin, end - begin) if mm is not None else None
        out[name] = StoredArray(Storage(dtype, numel, region), 0, shape)
    return out, meta
