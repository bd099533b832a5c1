"""Plain safetensors (or .npz) archives, one per round: flat files or Hugging Face folders.

    run/round_0.safetensors, run/round_1.safetensors, ...        flat, round from the file name
    run/round_0.masks.safetensors                                 optional masks, same number
    run/step_3/model.safetensors (or shards + index.json)         a folder per round
    run/step_3/masks.safetensors                                  optional masks

Masks are `....weight_mask` keys inside the weights file or a file with "mask" in its name. With
no mask stored anywhere in the run, the analysis infers masks from exact zeros (see reduce).
"""

from __future__ import annotations

import json
from pathlib import Path

from flowscan.errors import ScanError
from flowscan.io import npz_file, safetensors_file
from flowscan.readers.base import RawRound, Reader, Round
from flowscan.readers.numbering import (as_rounds, checked, group_files, ignored, is_run_name, numbered_groups,
                                        pattern_and_number, unique_rounds)
from flowscan.readers.registry import register

_EXTS = (".safetensors", ".npz")


def _is_array_file(p: Path) -> bool:
    return p.is_file() and p.name.endswith(_EXTS)


def _is_mask_file(p: Path) -> bool:
    return "mask" in p.name.lower()


def _folder_files(folder: Path) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """(weight files, mask files) of a per-round folder, honouring a shard index."""
    index = folder / "model.safetensors.index.json"
    files = sorted(p for p in folder.iterdir() if _is_array_file(p))
    masks = tuple(p for p in files if _is_mask_file(p))
    if index.is_file():
        return _shards(index), masks
    return tuple(p for p in files if not _is_mask_file(p)), masks


def _shards(index: Path) -> tuple[Path, ...]:
    """The shard files an HF index lists; each must be a file of the index's own folder."""
    try:
        weight_map = json.loads(index.read_bytes()).get("weight_map")
    except (OSError, ValueError, AttributeError, RecursionError) as exc:
        raise ScanError(index, f"unreadable shard index: {type(exc).__name__}: {exc}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ScanError(index, "shard index has no weight_map of tensor name -> shard file name")
    shards = []
    for name in sorted(set(weight_map.values())):
        shard = index.parent / name
        if Path(name).name != name or name in (".", "..") or not shard.is_file():
            raise ScanError(index, f"shard {name!r} is not a file beside the index (refused: an index "
                                   "may only name files of its own folder)")
        shards.append(shard)
    return tuple(shards)


def _round_folders(folder: Path) -> list[Path]:
    """Numbered subfolders holding one round's weights: no folders of their own, and weight files
    without round numbers (model.safetensors, or shards listed by an index). A subfolder of
    numbered files (seed_0/round_0.safetensors, ...) is a run of its own, not a round, and so is a
    folder named like a run (seed_0/model.safetensors)."""
    found = []
    for c in folder.iterdir():
        if c.is_dir() and pattern_and_number(c.name) and not is_run_name(c.name):
            children = list(c.iterdir())
            weights = [p for p in children if _is_array_file(p) and not _is_mask_file(p)]
            if any(p.is_dir() for p in children) or not weights:
                continue
            indexed = (c / "model.safetensors.index.json").is_file()
            if indexed or not any(pattern_and_number(p.name) and "-of-" not in p.name for p in weights):
                found.append(c)
    return found


def _load(path: Path):
    if path.name.endswith(".npz"):
        return npz_file.load(path)
    return safetensors_file.load(path)[0]


def _merge(paths) -> dict:
    """The arrays of several files of one round; a name in two files is an error, not a pick."""
    out: dict = {}
    where: dict = {}
    for path in paths:
        for name, array in _load(path).items():
            if name in out:
                raise ScanError(path, f"tensor {name!r} is also in {where[name].name}: which one is meant?")
            out[name], where[name] = array, path
    return out


@register
class SafetensorsReader(Reader):
    name = "safetensors"
    description = "safetensors/.npz per round (flat files or HF folders), masks alongside or inferred"

    def guess_can_open(self, folder: Path) -> bool:
        flat = [p for p in folder.iterdir() if _is_array_file(p) and not _is_mask_file(p)]
        return bool(numbered_groups(flat)) or bool(_round_folders(folder))

    def rounds(self, folder: Path):
        notes = []
        subdirs = _round_folders(folder)
        if subdirs:
            group = max(numbered_groups(subdirs).values(), key=len)
            numbered, note = as_rounds(unique_rounds(group))
            specs = [(n, *_folder_files(p)) for n, p in numbered]
        else:
            flat = [p for p in folder.iterdir() if _is_array_file(p)]
            weights = [p for p in flat if not _is_mask_file(p)]
            groups = group_files(weights)
            chosen = max(groups, key=lambda g: (len(g.items), g.pattern))
            numbered, note = as_rounds(unique_rounds(checked(chosen, folder).items))
            masks = [item for g in numbered_groups([p for p in flat if _is_mask_file(p)]).values() for item in g]
            mask_by_number = dict(unique_rounds(masks, "the mask file of round"))
            specs = [(n, (p,), (mask_by_number[n],) if n in mask_by_number else ()) for n, p in numbered]
            if chosen.why:   # names with several numbers: say which one is the round
                notes.append(f"round files: {chosen.describe()}")
            notes += ignored([g for g in groups if g is not chosen], weights, groups)
        if note:
            notes.append(note)
        rounds = [Round(n, self.name, w + m, (len(w),)) for n, w, m in specs]
        return rounds, notes

    def open_round(self, round: Round) -> RawRound:
        n_weights = round.spec[0]
        weight_files, mask_files = round.files[:n_weights], round.files[n_weights:]
        tensors, masks = _merge(weight_files), _merge(mask_files)
        where = weight_files[0] if len(weight_files) == 1 else weight_files[0].parent
        return RawRound(tensors, where, masks or None, mask_files[0] if mask_files else None)
