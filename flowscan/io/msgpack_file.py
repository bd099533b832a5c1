"""Flax msgpack checkpoints (`flax.serialization.to_bytes`, `flax.training.checkpoints`) as a
tree of dicts, lists and numpy arrays, without jax.

Flax writes a msgpack map whose array leaves are extension type 1 (a packed [shape, dtype
name, bytes]), numpy scalars type 3 (the same, 0-d) and Python complex numbers type 2; arrays
over 1 GiB are split into `{"__msgpack_chunked_array__": True, "shape": {...}, "chunks": {...}}`.
msgpack is data only (nothing in a file can name code), and every field is checked: the dtype
comes from a fixed list, the bytes must be exactly shape x itemsize, chunks must add up. The
file is read whole (msgpack cannot be memory-mapped), with a size limit.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from flowscan import extras
from flowscan.errors import ScanError
from flowscan.io.location import location

MAX_FILE_BYTES = 1 << 34        # 16 GiB: read whole, so a file claiming more is refused up front
MAX_DIMS = 32
EXT_NDARRAY, EXT_COMPLEX, EXT_SCALAR = 1, 2, 3
CHUNKED = "__msgpack_chunked_array__"
DTYPES = {name: np.dtype(name) for name in (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128")}
BFLOAT16 = "bfloat16"            # jax's; widened exactly to float32 (numpy has no bfloat16)


class _Bad(Exception):
    """A malformed field, reported with the file's name by `load`."""


def _msgpack():
    return extras.require("msgpack", "reading Flax msgpack checkpoints")


def load(path: Path) -> Any:
    """The checkpoint's tree: dicts (str keys), lists, numpy arrays and plain scalars."""
    msgpack = _msgpack()
    path = location(path)
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ScanError(path, f"{size} bytes: larger than flowscan reads whole ({MAX_FILE_BYTES})")
    data = path.read_bytes()
    try:
        tree = msgpack.unpackb(data, ext_hook=lambda code, payload: _ext(msgpack, code, payload),
                               raw=False, strict_map_key=False)
        return _unchunk(tree)
    except _Bad as exc:
        raise ScanError(path, str(exc)) from None
    except RecursionError:
        raise ScanError(path, "nested too deeply to read") from None
    except Exception as exc:  # noqa: BLE001 - msgpack raises ValueError, ExtraData, FormatError, ...
        raise ScanError(path, f"not a readable msgpack checkpoint: {type(exc).__name__}: {exc}") from None


def _ext(msgpack, code: int, payload: bytes):
    if code == EXT_NDARRAY:
        return _ndarray(msgpack, payload)
    if code == EXT_SCALAR:
        return _ndarray(msgpack, payload)[()]
    if code == EXT_COMPLEX:
        parts = msgpack.unpackb(payload)
        if not (isinstance(parts, list) and len(parts) == 2 and all(isinstance(p, (int, float)) for p in parts)):
            raise _Bad("a complex number that is not [real, imag]")
        return complex(parts[0], parts[1])
    raise _Bad(f"unknown msgpack extension type {code} (not written by flax.serialization)")


def _ndarray(msgpack, payload: bytes) -> np.ndarray:
    fields = msgpack.unpackb(payload, raw=True)
    if not (isinstance(fields, list) and len(fields) == 3):
        raise _Bad("an array that is not [shape, dtype, bytes]")
    shape, name, buffer = fields
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or \
            not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _Bad(f"an array with an invalid shape {shape!r}")
    if not isinstance(name, bytes) or not isinstance(buffer, bytes):
        raise _Bad("an array whose dtype or data is not bytes")
    dtype_name = name.decode("ascii", "replace")
    itemsize = 2 if dtype_name == BFLOAT16 else DTYPES[dtype_name].itemsize if dtype_name in DTYPES else None
    if itemsize is None:
        raise _Bad(f"an array of unsupported dtype {dtype_name!r}")
    count = math.prod(shape)
    if len(buffer) != count * itemsize:
        raise _Bad(f"an array of shape {tuple(shape)} {dtype_name} needs {count * itemsize} bytes, has {len(buffer)}")
    if dtype_name == BFLOAT16:   # the high half of a float32: exact
        wide = np.frombuffer(buffer, dtype="<u2").astype(np.uint32) << 16
        return wide.view(np.float32).reshape(shape)
    return np.frombuffer(buffer, dtype=DTYPES[dtype_name].newbyteorder("<")).reshape(shape)


def _unchunk(tree: Any) -> Any:
    """Chunked arrays joined back (iteratively: no recursion over a hostile depth)."""
    if isinstance(tree, dict) and CHUNKED in tree:
        return _join(tree)
    stack = [tree]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in list(items):
            if isinstance(value, dict) and CHUNKED in value:
                node[key] = _join(value)
            elif isinstance(value, (dict, list)):
                stack.append(value)
    return tree


def _join(node: dict) -> np.ndarray:
    shape, chunks = node.get("shape"), node.get("chunks")
    if not isinstance(shape, dict) or not isinstance(chunks, dict):
        raise _Bad("a chunked array without shape and chunks maps")
    try:
        dims = [shape[str(i)] for i in range(len(shape))]
        parts = [chunks[str(i)] for i in range(len(chunks))]
    except KeyError:
        raise _Bad("a chunked array whose shape or chunks are not numbered 0..n-1") from None
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims) or len(dims) > MAX_DIMS:
        raise _Bad(f"a chunked array with an invalid shape {dims!r}")
    if not parts or not all(isinstance(p, np.ndarray) and p.ndim == 1 and p.dtype == parts[0].dtype for p in parts):
        raise _Bad("a chunked array whose chunks are not 1-D arrays of one dtype")
    if sum(p.size for p in parts) != math.prod(dims):
        raise _Bad(f"a chunked array of shape {tuple(dims)} whose chunks hold {sum(p.size for p in parts)} values")
    return np.concatenate(parts).reshape(dims)
