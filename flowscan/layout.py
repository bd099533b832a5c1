"""flowscan's own archive layout: the one definition both `produce` (writer) and `analyze` use.

    RUN/                          one IMP run (one seed)
      flowscan-run.json           {"layout": "flowscan-imp", "version": 1, "args": {...}}
      round_0000/
        weights.safetensors       every trained tensor at the end of the round
        masks.safetensors         uint8 0/1 mask per prunable tensor, keyed like its weight
        round.json                {"round": 0, "density": 1.0, "metrics": {...}, ...}
      round_0001/ ...

A round folder is complete once its round.json exists: `write_round` builds the folder under a
temporary name and renames it into place, so a killed writer never leaves a half round.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from flowscan.io.atomic import current_umask, write_text
from flowscan.io.location import location
from flowscan.readers.numbering import unique_rounds

LAYOUT = "flowscan-imp"
VERSION = 1
RUN_MANIFEST = "flowscan-run.json"
ROUND_MANIFEST = "round.json"
WEIGHTS = "weights.safetensors"
MASKS = "masks.safetensors"
_ROUND_DIR = re.compile(r"^round_(\d+)$")


def round_dir(run: Path, index: int) -> Path:
    return Path(run) / f"round_{index:04d}"


def round_index(folder: Path) -> int | None:
    m = _ROUND_DIR.match(location(folder).name)
    return int(m.group(1)) if m else None


def complete_rounds(run: Path) -> list[tuple[int, Path]]:
    """(index, folder) of every complete round, in order."""
    found = []
    run = location(run)
    for child in run.iterdir() if run.is_dir() else ():
        index = round_index(child)
        if index is not None and (child / ROUND_MANIFEST).is_file():
            found.append((index, child))
    return unique_rounds(found)   # a round folder per number, or an error naming both


def read_json(path: Path) -> dict:
    with location(path).open("r") as f:
        return json.load(f)


def run_args(run: Path) -> dict | None:
    """The arguments `produce` made a run folder with (None: not a produce run)."""
    path = location(run) / RUN_MANIFEST
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except (OSError, ValueError, RecursionError) as exc:
        from flowscan.errors import FlowscanError

        raise FlowscanError(f"{path}: unreadable run manifest: {type(exc).__name__}: {exc}") from None
    args = data.get("args") if isinstance(data, dict) else None
    return args if isinstance(args, dict) else None


def args_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """'name: old -> new, ...' for every argument that differs ('' when none). An argument
    missing on one side (flowscan added it after the file was written) reads as unset, so it
    differs only if the other side sets it."""
    unset = (None, False)
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                     if old.get(k) != new.get(k)
                     and not ((k not in old or k not in new) and old.get(k) in unset and new.get(k) in unset))


def write_run_manifest(run: Path, args: Mapping[str, Any]) -> None:
    write_text(Path(run) / RUN_MANIFEST,
               json.dumps({"layout": LAYOUT, "version": VERSION, "args": dict(args)}, indent=2, sort_keys=True))


def contiguous(array, dtype=None) -> np.ndarray:
    """A C-contiguous copy or view of the same shape (np.ascontiguousarray makes 0-d arrays
    1-d, and a BatchNorm step counter would come back as [1] instead of [])."""
    array = np.asarray(array, dtype=dtype)
    return np.ascontiguousarray(array).reshape(array.shape)


def write_round(run: Path, index: int, weights: Mapping[str, np.ndarray],
                masks: Mapping[str, np.ndarray], info: Mapping[str, Any]) -> Path:
    """Write one complete round atomically (numpy arrays; masks stored as uint8 0/1)."""
    from safetensors.numpy import save_file

    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    final = round_dir(run, index)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=run))
    os.chmod(tmp, 0o777 & ~current_umask())
    try:
        save_file({k: contiguous(v) for k, v in weights.items()}, str(tmp / WEIGHTS))
        save_file({k: contiguous(v, np.uint8) for k, v in masks.items()}, str(tmp / MASKS))
        (tmp / ROUND_MANIFEST).write_text(json.dumps({"round": index, **info}, indent=2, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
