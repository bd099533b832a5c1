"""Chen et al.'s BERT tickets (VITA-Group/BERT-Tickets).

`checkpoint-{step}/model.pt` is a whole pickled `BertFor...` module (read through stubs, never
executed) and `checkpoint-{step}/mask.pt` a dict of `....weight_mask`. With the folders sorted
numerically, the k-th folder's model.pt holds round k-1 (trained under mask k-1, prune-style
from round 1) and its mask.pt is the mask of round k; the last mask.pt (all zeros) has no
weights and is not a round. Accuracies are in `result.pt`: a list of dicts, entry n = round n
(at the run's top level), or one dict per checkpoint folder.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from flowscan.io import torch_file
from flowscan.readers.base import RawRound, Reader, Round
from flowscan.readers.torch_round import open_torch_round
from flowscan.readers.numbering import unique_rounds
from flowscan.readers.registry import register

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _checkpoints(folder: Path) -> list[Path]:
    found = [(int(m.group(1)), c) for c in folder.iterdir()
             if (m := _CHECKPOINT.match(c.name)) and c.is_dir()
             and ((c / "model.pt").is_file() or (c / "mask.pt").is_file())]
    return [c for _n, c in unique_rounds(found, "checkpoint step")]


def _metric_dict(obj) -> dict[str, float]:
    if not isinstance(obj, Mapping):
        return {}
    out = {}
    for key, value in obj.items():
        try:
            value = np.asarray(value)
        except Exception:  # noqa: BLE001 - a stub or other non-number: skip it
            continue
        if value.shape == () and value.dtype.kind in "fiu":
            out[str(key)] = float(value)
    return out


def _results(path: Path) -> list[dict[str, float]]:
    obj = torch_file.load(path)
    if isinstance(obj, (list, tuple)):
        return [_metric_dict(x) for x in obj]
    return [_metric_dict(obj)]


@register
class BertTicketsReader(Reader):
    name = "bert-tickets"
    description = "Chen et al. BERT tickets: checkpoint-*/{model.pt (pickled module), mask.pt}, result.pt"

    def guess_can_open(self, folder: Path) -> bool:
        return any((c / "mask.pt").is_file() for c in _checkpoints(folder))

    def rounds(self, folder: Path):
        folders = _checkpoints(folder)
        run_results = _results(folder / "result.pt") if (folder / "result.pt").is_file() else []
        rounds, notes = [], []
        for k, ckpt in enumerate(folders, start=1):
            index = k - 1
            model = ckpt / "model.pt"
            if not model.is_file():
                if k < len(folders):   # the last folder holds only the final mask: that is no round
                    rounds.append(Round(index, self.name, (), incomplete=f"{ckpt}: no model.pt"))
                else:
                    notes.append(f"{ckpt.name}: mask.pt only (round {index + 1}'s mask, no weights); not a round")
                continue
            # round n's mask is mask.pt of folder n (1-based); round 0 is dense
            mask = folders[index - 1] / "mask.pt" if index >= 1 else None
            if mask is not None and not mask.is_file():
                rounds.append(Round(index, self.name, (model,), incomplete=f"{mask}: missing (round {index}'s mask)"))
                continue
            files = (model,) + ((mask,) if mask is not None else ())
            metrics = dict(run_results[index]) if index < len(run_results) else {}
            if (ckpt / "result.pt").is_file():
                metrics.update(_results(ckpt / "result.pt")[-1])
            rounds.append(Round(index, self.name, files, (), metrics))
        return rounds, notes

    def open_round(self, round: Round) -> RawRound:
        return open_torch_round(round.files[0], round.files[1] if len(round.files) > 1 else None)
