"""Canonical tensor names, and pairing each weight with its mask, for every layout.

Conventions handled (the facts about each code base are in the readers' docstrings): torch.nn.utils.prune's `X.weight_orig` + `X.weight_mask`
(the effective weight is their product; `weight_orig` is not zero where pruned), open_lth's
`mask_a___b___weight` buffers, separate mask files keyed `X.weight` or `X.weight_mask`, the
DataParallel `module.` prefix, an optional `model.` prefix, and a `select` prefix (MoCo's
`encoder_q`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from flowscan.errors import ScanError, printable
from flowscan.io.arrays import ChunkedArray, LoadedArray, StoredArray
from flowscan.io.torch_file import UnreadableTensor
from flowscan.readers.base import NameOptions, RawRound, TensorRef

_OPENLTH_MASK = re.compile(r"^mask_(.+)$")


def canonical(name: str, opts: NameOptions) -> str | None:
    """Canonical name, or None when `select` excludes it."""
    while name.startswith("module."):
        name = name[len("module."):]
    if opts.select:
        prefix = opts.select.rstrip(".") + "."
        if not name.startswith(prefix):
            return None
        name = name[len(prefix):]
    if opts.strip_model_prefix and name.startswith("model."):
        name = name[len("model."):]
    return printable(name)   # a control character in a tensor name is shown escaped, never run


# The array types readers build themselves. Nothing else is a tensor, whatever attributes it has:
# an object from a file that carried `shape`, `dtype` and `__array_interface__` would have numpy
# follow a pointer the file chose.
LAZY_ARRAY_TYPES = (StoredArray, LoadedArray, ChunkedArray)


def is_array(value: Any) -> bool:
    return type(value) is np.ndarray or isinstance(value, LAZY_ARRAY_TYPES)   # not a subclass of ndarray


def is_tensor(value: Any) -> bool:
    """An array, or a tensor the file holds that flowscan cannot read exactly (an error if used)."""
    return is_array(value) or isinstance(value, UnreadableTensor)


def _canonical_items(arrays: Mapping[str, Any], opts: NameOptions, path: Path | None = None
                     ) -> Iterable[tuple[str, str, Any]]:
    for raw, value in arrays.items():
        if isinstance(value, UnreadableTensor):
            raise ScanError(path, f"cannot be read exactly: {value.reason}", tensor=str(raw))
        if not is_array(value):
            continue
        name = canonical(str(raw), opts)
        if name is not None:
            yield raw, name, value


def pair(raw: RawRound, opts: NameOptions) -> list[TensorRef]:
    """TensorRefs in file order: one per weight, with its mask where one is stored."""
    items = list(_canonical_items(raw.tensors, opts, raw.path))
    weights: dict[str, tuple[str, Any]] = {}
    for raw_name, name, value in items:
        if name.endswith("_orig"):
            weights[name[: -len("_orig")]] = (raw_name, value)  # prune-style wins over a plain copy
        else:
            weights.setdefault(name, (raw_name, value))
    masks: dict[str, tuple[str, Any, Path]] = {}
    for raw_name, name, value in items:
        base = None
        if name.endswith("_mask"):
            base = name[: -len("_mask")]
        elif (m := _OPENLTH_MASK.match(name)) and "___" in name:
            base = m.group(1).replace("___", ".")
        # An embedded "*_mask" without a matching weight is an ordinary tensor (e.g. a buffer).
        if base is not None and base in weights:
            masks[base] = (raw_name, value, raw.path)
            if weights.get(name, (None,))[0] == raw_name:
                del weights[name]
    # A separate masks file fills in masks the weights file does not carry itself.
    for raw_name, name, value in _canonical_items(raw.masks or {}, opts, raw.mask_path or raw.path):
        base = name[: -len("_mask")] if name.endswith("_mask") else name
        masks.setdefault(base, (raw_name, value, raw.mask_path or raw.path))

    refs = []
    for name, (raw_name, weight) in weights.items():
        mask_entry = masks.pop(name, None)
        if mask_entry is None:
            refs.append(TensorRef(name, weight, None, raw.path))
            continue
        mask_raw, mask, mask_path = mask_entry
        if is_packed_mask(mask, weight):
            mask = unpacked(mask, weight)
            note = "packed masks (jaxpruner's use_packed_masks: uint8, 8 entries a byte) unpacked, big-endian bits"
            if note not in raw.notes:
                raw.notes.append(note)
        if tuple(mask.shape) != tuple(weight.shape):
            raise ScanError(mask_path, f"mask {mask_raw!r} has shape {tuple(mask.shape)} but its weight "
                                       f"{raw_name!r} in {raw.path} has shape {tuple(weight.shape)}",
                            tensor=name)
        if raw_name.endswith("_orig") and _PRUNE_NOTE not in raw.notes:
            raw.notes.append(_PRUNE_NOTE)
        refs.append(TensorRef(name, weight, mask, raw.path, mask_path))
    if masks:
        name, (mask_raw, _m, mask_path) = next(iter(masks.items()))
        raise ScanError(mask_path, f"mask {mask_raw!r} has no matching weight in {raw.path} "
                                   f"({len(masks)} unmatched mask(s); wrong --select or prefix?)",
                        tensor=name)
    return refs


_PRUNE_NOTE = ("torch.nn.utils.prune layout: each weight is X.weight_orig x X.weight_mask (weight_orig keeps "
               "its values where pruned; the product is the network's weight)")


def is_packed_mask(mask: Any, weight: Any) -> bool:
    """A mask stored as `jnp.packbits(mask)`: uint8 of ceil(n/8) entries beside a weight of n > 1."""
    shape, weight_shape = tuple(mask.shape), tuple(weight.shape)
    if len(shape) != 1 or shape == weight_shape:   # the cheap tests first: this runs per tensor
        return False
    n = math.prod(weight_shape)
    return n > 1 and shape[0] == (n + 7) // 8 and str(mask.dtype) == "uint8"


def unpacked(mask: Any, weight: Any) -> LoadedArray:
    """The 0/1 mask of `weight`'s shape, `np.unpackbits(packed)[:n]` (jaxpruner's bit order), read lazily."""
    shape = tuple(int(d) for d in weight.shape)
    n = math.prod(shape)

    def load() -> np.ndarray:
        return np.unpackbits(np.asarray(mask, dtype=np.uint8), count=n).reshape(shape)
    return LoadedArray(shape, np.dtype(np.uint8), load)
