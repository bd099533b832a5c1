"""torch.nn.utils.prune state dicts, one file per round (Chen et al.'s CV layout and others).

Chen et al. (CV_LTH_Pre-training) write `{k}checkpoint.pth.tar` at the end of each round's
training (what gets pruned), plus `{k}model_SA_best.pth.tar` / `{k}model_best.pth.tar` for the
best epoch; we prefer the first. The state dict sits at top level or under `state_dict`;
rounds >= 1 are prune-style (`X.weight_orig` x `X.weight_mask`); a `mask` dict (ImageNet runs)
serves as a separate masks file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from flowscan.errors import ScanError
from flowscan.io import torch_file
from flowscan.io.safe_pickle import safe_load
from flowscan.readers.base import RawRound, Reader, Round
from flowscan.readers.torch_round import open_torch_round
from flowscan.readers.numbering import checked, group_files, ignored, numbered_groups, unique_rounds
from flowscan.readers.registry import register

# Preferred file families when a folder holds several (first match wins).
_PREFERENCE = ("{n}checkpoint", "{n}model_SA_best", "{n}model_best")


def _torch_files(folder: Path) -> list[Path]:
    if isinstance(folder, Path):   # a local folder: its entries' types come with the listing, no stat each
        with os.scandir(folder) as entries:
            names = sorted(e.name for e in entries if e.name.lower().endswith(torch_file.TORCH_SUFFIXES) and e.is_file())
        return [folder / name for name in names]   # sorted as strings: Path comparisons are slow
    return sorted(p for p in folder.iterdir() if torch_file.is_torch_file(p))


@register
class PruneStyleReader(Reader):
    name = "prune-style"
    description = "torch state dicts per round, prune-style X.weight_orig x X.weight_mask (Chen et al. CV)"

    def guess_can_open(self, folder: Path) -> bool:
        return bool(numbered_groups(_torch_files(folder)))

    def rounds(self, folder: Path):
        files = _torch_files(folder)
        groups = group_files(files)
        if not groups:
            raise ScanError(folder, "no torch checkpoint files with a round number in their name")
        chosen = next((g for pref in _PREFERENCE for g in groups if g.pattern.startswith(pref)), None)
        if chosen is None:
            chosen = max(groups, key=lambda g: (len(g.items), g.pattern))
        notes = [f"round files: {chosen.describe()}"] + ignored([g for g in groups if g is not chosen], files, groups)
        numbered = unique_rounds(checked(chosen, folder).items)
        dumps, note = dumped_masks(folder, chosen.pattern)
        if note:
            notes.append(note)
        if not dumps:
            return [Round(n, self.name, (path,)) for n, path in numbered], notes
        # a round is complete once its mask is dumped, after its training: a later model file is training
        return [Round(n, self.name, (path, dumps[k]) if k < len(dumps) else (path,),
                      incomplete="" if k < len(dumps) else f"{path.name}: its mask is not dumped yet (still training?)")
                for k, (n, path) in enumerate(numbered)], notes

    def open_round(self, round: Round) -> RawRound:
        if len(round.files) > 1 and round.files[1].suffix == ".pkl":
            return open_module_round(round.files[0], round.files[1])
        return open_torch_round(round.files[0], round.files[1] if len(round.files) > 1 else None)


# rahulvigneswaran/Lottery-Ticket-Hypothesis-in-Pytorch (the most used PyTorch LTH code): rounds are
# whole pickled modules saves/<arch>/<data>/<k>_model_<type>.pth.tar; each round's mask is dumped
# after its training as dumps/lt/<arch>/<data>/<type>_mask_<density %>.pkl, a pickled list of numpy
# arrays, one per parameter whose name holds "weight", in named_parameters() order.
_MODULE_ROUND = re.compile(r"^\{n\}_model_(\w+)\.pth\.tar$")
_MASK_DUMP = re.compile(r"^(\w+)_mask_(\d+(?:\.\d+)?)\.pkl$")


def dumped_masks(folder: Path, pattern: str) -> tuple[list[Path], str | None]:
    """The mask dumps of a run in that layout, densest first (round k's is the k-th: IMP only ever
    removes weights), and a note; ([], None) for other layouts or where there are none."""
    m = _MODULE_ROUND.match(pattern)
    if not m or folder.parent.parent.name != "saves":
        return [], None
    dumps = folder.parent.parent.parent / "dumps" / "lt" / folder.parent.name / folder.name
    found = []
    if dumps.is_dir():
        for p in dumps.iterdir():
            dump = _MASK_DUMP.match(p.name)
            if dump and dump.group(1) == m.group(1):
                found.append((float(dump.group(2)), p))
    if not found:
        return [], (f"no mask dumps in {dumps} ({m.group(1)}_mask_<density>.pkl): masks are inferred from "
                    "the weights' zeros")
    found.sort(key=lambda item: -item[0])
    return [p for _d, p in found], (f"masks read from {dumps}/{m.group(1)}_mask_*.pkl, round k's being the k-th "
                                    f"densest ({', '.join(f'{d:g} %' for d, _p in found[:4])}"
                                    f"{', ...' if len(found) > 4 else ''}), matched to the weights in "
                                    "named_parameters order")


def open_module_round(weights: Path, dump: Path) -> RawRound:
    """A pickled module and its dumped mask list, as named tensors."""
    notes: list[str] = []
    obj = torch_file.load(weights, notes)
    if not torch_file.is_module(obj):
        raise ScanError(weights, "not a pickled module, as its mask dump beside it implies")
    with dump.open("rb") as f:
        masks = safe_load(f, str(dump)).value
    if not isinstance(masks, list) or not all(type(m) is np.ndarray for m in masks):
        raise ScanError(dump, "not a pickled list of numpy mask arrays")
    names = [n for n in torch_file.module_state_dict(obj, kinds=("_parameters",)) if "weight" in n]
    if len(names) != len(masks):
        raise ScanError(dump, f"holds {len(masks)} masks, but {weights.name} has {len(names)} parameters whose "
                              "name holds 'weight' (the layout's rule): not this run's masks?")
    return RawRound(torch_file.module_state_dict(obj), weights, dict(zip(names, masks)), dump, {}, notes)
