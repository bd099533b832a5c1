"""Flax msgpack checkpoints, one file per round (JAX pruning code).

    run/checkpoint_<step>           flax.training.checkpoints.save_checkpoint (no extension)
    run/round_3.msgpack             flax.serialization.to_bytes({"params": ..., "masks": ...})

The weights are the `params` tree (also under `target`, and a `params` collection nested in it),
named by their tree paths joined with dots (`params/Conv_0/kernel` -> `Conv_0.kernel`). The
masks are a parallel tree under a key `masks` or `mask` anywhere else in the checkpoint (beside
the params, or in the optimizer state as JAX pruning libraries keep them); `None` leaves (biases)
carry no mask. Other trees of the same shapes (Adam's `mu`/`nu`) are not masks. Two candidate
mask trees are an error naming both. Rounds are the file numbers when they are 0, 1, 2, ...,
else their rank (step-numbered checkpoints). Needs `msgpack` (`pip install 'flowscan[flax]'`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from flowscan.errors import ScanError
from flowscan.io import msgpack_file
from flowscan.readers.base import FilePerRoundReader
from flowscan.readers.registry import register

MASK_KEYS = ("masks", "mask")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves by dotted path (iteratively), in the tree's order."""
    out, stack = {}, [(prefix, tree)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, dict):
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in reversed(list(node.items())))
        elif isinstance(node, list):
            stack.extend((f"{path}.{i}" if path else str(i), v) for i, v in reversed(list(enumerate(node))))
        else:
            out[path] = node
    return out


def _params(tree: dict, path: Path) -> tuple[dict, str]:
    for route in (("params",), ("target", "params")):
        node: Any = tree
        for key in route:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            if set(node) == {"params"} and isinstance(node["params"], dict):  # a variables dict
                return node["params"], "/".join(route) + "/params"
            return node, "/".join(route)
    raise ScanError(path, f"no 'params' tree (top-level keys: {', '.join(map(str, list(tree)[:8]))})")


def _mask_trees(tree: dict, params: dict) -> list[tuple[str, dict]]:
    """(path, subtree) of every map under a key `masks`/`mask`, outside the params."""
    found, stack = [], [("", tree)]
    while stack:
        path, node = stack.pop()
        if node is params or not isinstance(node, (dict, list)):
            continue
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            sub = f"{path}/{key}" if path else str(key)
            if str(key) in MASK_KEYS and isinstance(value, dict):
                if set(value) == {"params"} and isinstance(value["params"], dict):  # masks of a variables dict
                    value, sub = value["params"], f"{sub}/params"
                found.append((sub, value))
            else:
                stack.append((sub, value))
    return found


def split(tree: Any, path: Path, is_array=lambda v: isinstance(v, np.ndarray)) -> tuple[dict, dict]:
    """(weights, masks) of a decoded checkpoint tree (also Orbax's, whose leaves are lazy arrays)."""
    if not isinstance(tree, dict):
        raise ScanError(path, "not a Flax checkpoint: the top level is not a map")
    params, where = _params(tree, path)
    weights = {k: v for k, v in flatten(params).items() if is_array(v)}
    if not weights:
        raise ScanError(path, f"'{where}' holds no arrays")
    candidates = []
    for sub, node in _mask_trees(tree, params):
        leaves = {k: v for k, v in flatten(node).items() if v is not None}
        if leaves and set(leaves) <= set(weights) and all(is_array(v) for v in leaves.values()):
            candidates.append((sub, leaves))
    if len(candidates) > 1:
        raise ScanError(path, f"two mask trees parallel to '{where}': {candidates[0][0]} and {candidates[1][0]}")
    return weights, candidates[0][1] if candidates else {}


@register
class FlaxReader(FilePerRoundReader):
    name = "flax"
    description = ("Flax msgpack checkpoints per round: checkpoint_<step> or *N*.msgpack, masks as a parallel "
                   "tree")
    needs = ("msgpack",)
    file_pattern = re.compile(r"^(checkpoint_\d+|.*\d.*\.msgpack)$")
    what = "Flax checkpoint"

    def read(self, path: Path) -> tuple[dict, dict]:
        return split(msgpack_file.load(path), path)
