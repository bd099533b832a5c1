"""torch.nn.utils.prune state dicts, one file per round (Chen et al.'s CV layout and others).

Chen et al. (CV_LTH_Pre-training) write `{k}checkpoint.pth.tar` at the end of each round's
training (what gets pruned), plus `{k}model_SA_best.pth.tar` / `{k}model_best.pth.tar` for the
best epoch; we prefer the first. The state dict sits at top level or under `state_dict`;
rounds >= 1 are prune-style (`X.weight_orig` x `X.weight_mask`); a `mask` dict (ImageNet runs)
serves as a separate masks file.
"""

from __future__ import annotations

from pathlib import Path

from flowscan.errors import ScanError
from flowscan.io import torch_file
from flowscan.readers.base import RawRound, Reader, Round
from flowscan.readers.torch_round import open_torch_round
from flowscan.readers.numbering import checked, group_files, ignored, numbered_groups, unique_rounds
from flowscan.readers.registry import register

# Preferred file families when a folder holds several (first match wins).
_PREFERENCE = ("{n}checkpoint", "{n}model_SA_best", "{n}model_best")


def _torch_files(folder: Path) -> list[Path]:
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
        rounds = [Round(n, self.name, (path,)) for n, path in unique_rounds(checked(chosen, folder).items)]
        return rounds, notes

    def open_round(self, round: Round) -> RawRound:
        return open_torch_round(round.files[0], round.files[1] if len(round.files) > 1 else None)
