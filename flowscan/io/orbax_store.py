"""Orbax checkpoints through tensorstore (Orbax's own storage library), without jax or orbax.

A checkpoint item folder holds `_METADATA`, a JSON map from each pytree leaf's key path to its
value type, and the arrays as zarr (or zarr3) arrays named by the dotted key path, inside an
OCDBT database or as plain folders. `tree()` rebuilds the pytree from `_METADATA` alone, with
every array leaf a lazy array whose shape and dtype come from its zarr header; the data is read
when reduced. Scalars and `None` leaves (masks of biases) stay out of the arrays. bfloat16 is
widened to float32. Needs `pip install 'flowscan[orbax]'` (tensorstore).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from flowscan import extras
from flowscan.errors import ScanError
from flowscan.io.arrays import ChunkedArray
from flowscan.io.location import is_remote, location
from flowscan.io.budget import BUDGET

METADATA = "_METADATA"
MAX_METADATA_BYTES = 256 << 20
CACHE_BYTES = 32 << 20        # tensorstore's cache of one checkpoint's metadata (and recent chunks)
MAX_CHUNKS = 1 << 20          # chunks of one array: real checkpoints have a few per array
_ARRAY_TYPES = ("np.ndarray", "jax.Array", "scalar")   # stored as zarr arrays
_KEY_TYPES = {1: "index", 2: "key"}


def _tensorstore():
    return extras.require("tensorstore", "reading Orbax checkpoints")


def read_metadata(folder) -> dict:
    path = location(folder) / METADATA
    try:
        if path.stat().st_size > MAX_METADATA_BYTES:
            raise ScanError(path, f"larger than {MAX_METADATA_BYTES} bytes (refused)")
        data = json.loads(path.read_bytes())
    except ScanError:
        raise
    except (OSError, ValueError, RecursionError) as exc:
        raise ScanError(path, f"unreadable Orbax metadata: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("tree_metadata"), dict):
        raise ScanError(path, "not Orbax metadata: no 'tree_metadata' map")
    return data


def _kvstore(folder) -> dict:
    """The tensorstore kvstore of a checkpoint folder: tensorstore's own drivers for files, gs://,
    s3:// (endpoint and region from the usual AWS/fsspec settings) and http(s) servers that honour
    Range; other stores, and servers that do not, are read from a downloaded copy."""
    folder = location(folder)
    if not is_remote(folder):
        return {"driver": "file", "path": str(folder.resolve()) + "/"}
    protocol = folder.store.protocol
    if protocol in ("http", "https") and folder.store.honours_range(str(folder / METADATA)):
        return {"driver": "http", "base_url": str(folder) + "/", "path": ""}
    if protocol in ("gs", "gcs"):
        bucket, _, key = folder.path.partition("/")
        return {"driver": "gcs", "bucket": bucket, "path": key + "/"}
    if protocol in ("s3", "s3a"):
        bucket, _, key = folder.path.partition("/")
        spec = {"driver": "s3", "bucket": bucket, "path": key + "/"}
        endpoint = (getattr(folder.store.fs, "client_kwargs", {}) or {}).get("endpoint_url") \
            or getattr(folder.store.fs, "endpoint_url", None) \
            or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        spec.update({k: v for k, v in (("endpoint", endpoint), ("aws_region", region)) if v})
        return spec
    return {"driver": "file", "path": str(folder.store.local_tree(folder)) + "/"}


def _spec(base: dict, meta: dict, name: str) -> dict:
    if meta.get("use_ocdbt", True):
        kvstore = {"driver": "ocdbt", "base": base}
        return {"driver": "zarr3" if meta.get("use_zarr3") else "zarr", "kvstore": kvstore, "path": name}
    kvstore = {**base, "path": base["path"] + name + "/"}   # use_ocdbt=False: a folder per array
    return {"driver": "zarr3" if meta.get("use_zarr3") else "zarr", "kvstore": kvstore}


def _keys(entry: Any, where, raw_key: str) -> list:
    keys = entry.get("key_metadata") if isinstance(entry, dict) else None
    if not isinstance(keys, list) or not keys or not all(isinstance(k, dict) and "key" in k for k in keys):
        raise ScanError(where, f"entry {raw_key!r} has no key_metadata list")
    out = []
    for k in keys:
        key = k["key"]
        # keys become kvstore paths: no dots (`..`), no separators, so none leaves the checkpoint folder
        if not isinstance(key, (str, int)) or isinstance(key, bool) or str(key) == "" \
                or any(c in str(key) for c in "./\\\0"):
            raise ScanError(where, f"entry {raw_key!r} has a malformed key {key!r}")
        out.append(str(key))
    return out


def tree(folder) -> dict:
    """The checkpoint's pytree: nested dicts whose array leaves are lazy arrays, None elsewhere."""
    ts = _tensorstore()
    folder = location(folder)
    meta = read_metadata(folder)
    where = folder / METADATA
    base = _kvstore(folder)
    # one context for the whole checkpoint: the OCDBT manifest and tree nodes are read once, not per array
    context = ts.Context({"cache_pool": {"total_bytes_limit": CACHE_BYTES}})
    root: dict = {}
    for raw_key, entry in meta["tree_metadata"].items():
        keys = _keys(entry, where, raw_key)
        value = entry.get("value_metadata") if isinstance(entry.get("value_metadata"), dict) else {}
        kind = value.get("value_type")
        leaf = None
        if kind in _ARRAY_TYPES and not value.get("skip_deserialize", False):
            name = ".".join(keys)
            leaf = _lazy(ts.open(_spec(base, meta, name), read=True, context=context), folder, name)
        node = root
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ScanError(where, f"entry {raw_key!r} lies below a leaf")
        if keys[-1] in node:
            raise ScanError(where, f"entry {raw_key!r} is listed twice")
        node[keys[-1]] = leaf
    return root


def _lazy(opening, folder, name: str) -> ChunkedArray:
    """An array read in slices when reduced (bounded memory), after its declared size and chunk
    count are checked: a few bytes of metadata can declare billions of chunks over a fill value."""
    try:
        store = opening.result()
        shape, dtype = tuple(int(n) for n in store.shape), np.dtype(store.dtype.numpy_dtype)
        chunk = tuple(int(c) for c in store.chunk_layout.read_chunk.shape or shape)
    except Exception as exc:  # noqa: BLE001 - tensorstore reports damage as ValueError, RuntimeError ...
        raise ScanError(folder, f"array {name!r} cannot be opened: {_short(exc)}") from None
    widen = dtype.name == "bfloat16"
    out_dtype = np.dtype(np.float32) if widen else dtype
    if dtype.kind not in "biuf" and not widen:
        raise ScanError(folder, f"array {name!r} has dtype {dtype}, not a number type")
    nbytes = int(np.prod(shape, dtype=object)) * out_dtype.itemsize
    rows = chunk[0] if shape else None   # bands of whole chunks: each decompressed once
    if nbytes > BUDGET.total or (rows and ChunkedArray.band_bytes(shape, out_dtype, rows) > BUDGET.total):
        raise ScanError(folder, f"array {name!r} of shape {shape} in chunks of {chunk} needs more memory at "
                                f"once than flowscan's budget of {BUDGET.total:,} bytes (refused)")
    chunks = int(np.prod([-(-n // max(c, 1)) for n, c in zip(shape, chunk)], dtype=object)) if shape else 1
    if chunks > MAX_CHUNKS:
        raise ScanError(folder, f"array {name!r} declares {chunks} chunks (more than {MAX_CHUNKS}; refused)")

    def read(index) -> np.ndarray:
        try:
            data = np.asarray(store[index].read().result())
        except Exception as exc:  # noqa: BLE001 - as above
            raise ScanError(folder, f"array {name!r} cannot be read: {_short(exc)}") from None
        return data.astype(out_dtype, copy=False)
    return ChunkedArray(shape, out_dtype, read, rows)


def _short(exc: Exception) -> str:
    """tensorstore's message without the full spec it appends."""
    return f"{type(exc).__name__}: {str(exc).split(' [tensorstore_spec=')[0]}"


def is_array(value: Any) -> bool:
    return isinstance(value, ChunkedArray)
