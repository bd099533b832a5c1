"""Opening a round stored as torch files: a checkpoint with the weights, and maybe a masks file.

Code bases put the state dict in different places (top level, `state_dict`, a whole pickled
module, ...) and keep masks inside it (prune-style), beside it (`mask`), or in a second file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from flowscan.errors import ScanError
from flowscan.io import torch_file
from flowscan.io.torch_file import is_module, module_state_dict
from flowscan.readers.base import RawRound
from flowscan.readers.names import is_tensor


def open_torch_round(weights: Path, masks: Path | None = None) -> RawRound:
    """The tensors, masks and float metrics of a torch checkpoint (+ an optional masks file)."""
    notes: list[str] = []
    obj = torch_file.load(weights, notes)
    tensors = state_dict_of(obj)
    if tensors is None:
        raise ScanError(weights, "no state dict found (looked for a pickled module, the top level "
                                 "and state_dict/model_state_dict/model/net)")
    mask_dict, mask_path = None, None
    if masks is not None:
        mask_dict, mask_path = torch_file.load(masks, notes), masks
        if not isinstance(mask_dict, Mapping):
            raise ScanError(masks, "mask file is not a dict of tensors")
    elif isinstance(obj, Mapping):  # Chen et al.'s ImageNet runs keep a mask dict beside the weights
        candidate = obj.get("mask", obj.get("masks"))
        if isinstance(candidate, Mapping) and candidate is not tensors:
            mask_dict, mask_path = candidate, weights
    return RawRound(tensors, weights, mask_dict, mask_path, scalar_metrics(obj), notes)


def state_dict_of(obj: Any) -> Mapping[str, Any] | None:
    """The tensor mapping inside a loaded checkpoint object, wherever the code base put it."""
    if is_module(obj):
        return module_state_dict(obj)
    if not isinstance(obj, Mapping):
        return None
    for key in ("state_dict", "model_state_dict", "model", "net", "model_state"):
        inner = obj.get(key)
        if is_module(inner):
            return module_state_dict(inner)
        if isinstance(inner, Mapping) and any(is_tensor(v) for v in inner.values()):
            return inner
    if any(is_tensor(v) for v in obj.values()):
        return obj
    return None


def scalar_metrics(obj: Any) -> dict[str, float]:
    """Float-valued top-level entries of a checkpoint dict (e.g. Chen et al.'s best_sa), and the last
    value of each per-epoch list in its `result` dict as `result.<name>` (Chen et al.'s `test_ta`:
    the test accuracy, in percent, of the epoch the checkpoint holds)."""
    out = {}
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if _is_float(value):
                out[str(key)] = float(value)
        result = obj.get("result")
        if isinstance(result, Mapping):
            for key, values in result.items():
                if isinstance(values, (list, tuple)) and values and (_is_float(values[-1]) or
                                                                     isinstance(values[-1], int)):
                    out[f"result.{key}"] = float(values[-1])
    return out


def _is_float(value: Any) -> bool:
    return isinstance(value, (float, np.floating)) or (
        isinstance(value, np.ndarray) and value.shape == () and value.dtype.kind == "f")
