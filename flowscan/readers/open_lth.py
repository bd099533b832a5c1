"""open_lth (Frankle et al.) and its forks (ElasticLTH, lth_diet).

A run is one `replicate_<r>/` folder; round L is `level_<L>/main/`, with `mask.pth` (0/1 int32
per prunable weight) and the trained weights in the highest-step `model_ep{E}_it{I}.pth`
(lth_diet: `model_final.pt` + `mask.pt`; fallback: the resume `checkpoint.pth`). Sibling
branches (`lottery_branch_*`) and `level_pretrain` are not trunk rounds. Saved end weights are
not guaranteed to be zero where pruned, so the mask is always applied. Metrics come from the
headerless `logger` CSV (`name,iteration,value`), the value at the last iteration.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from flowscan.errors import ScanError
from flowscan.readers.base import RawRound, Reader, Round
from flowscan.readers.torch_round import open_torch_round
from flowscan.readers.numbering import unique_rounds
from flowscan.readers.registry import register

_LEVEL = re.compile(r"^level_(\d+)$")
_MODEL = re.compile(r"^model_ep(\d+)_it(\d+)\.pth$")
_MASK_FILES = ("mask.pth", "mask.pt")


def _levels(folder: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), child) for child in folder.iterdir()
             if (m := _LEVEL.match(child.name)) and (child / "main").is_dir()]
    return [(n, level / "main") for n, level in unique_rounds(found, "level")]


def _weights_file(main: Path) -> Path | None:
    steps = [(tuple(map(int, m.groups())), p) for p in main.iterdir() if (m := _MODEL.match(p.name))]
    if steps:
        return max(steps)[1]
    for name in ("model_final.pt", "checkpoint.pth"):
        if (main / name).is_file():
            return main / name
    return None


def read_logger(path: Path) -> dict[str, float]:
    """Last-iteration value of each metric in an open_lth `logger` file."""
    last: dict[str, tuple[int, float]] = {}
    try:
        with path.open("r", newline="") as f:
            for lineno, row in enumerate(csv.reader(f), 1):
                if not row:
                    continue
                if len(row) != 3:
                    raise ScanError(path, f"line {lineno}: expected name,iteration,value")
                name, iteration, value = row[0], int(row[1]), float(row[2])
                if name not in last or iteration >= last[name][0]:
                    last[name] = (iteration, value)
    except ValueError as exc:
        raise ScanError(path, f"unreadable logger line: {exc}") from None
    return {name: value for name, (_it, value) in last.items()}


@register
class OpenLTHReader(Reader):
    name = "open_lth"
    description = "open_lth & forks: replicate_*/level_*/main/{mask.pth, model_ep*_it*.pth, logger}"

    def guess_can_open(self, folder: Path) -> bool:
        return bool(_levels(folder))

    def rounds(self, folder: Path):
        rounds, notes = [], []
        for level, main in _levels(folder):
            weights = _weights_file(main)
            if weights is None:
                notes.append(f"level_{level}: no trained weights (model_ep*_it*.pth) yet; skipped")
                continue
            mask = next((main / m for m in _MASK_FILES if (main / m).is_file()), None)
            files = (weights,) + ((mask,) if mask else ())
            metrics = read_logger(main / "logger") if (main / "logger").is_file() else {}
            rounds.append(Round(level, self.name, files, (), metrics))
        if rounds:
            notes.append(f"weights: {rounds[-1].files[0].name} (highest step) per level")
        return rounds, notes

    def open_round(self, round: Round) -> RawRound:
        return open_torch_round(round.files[0], round.files[1] if len(round.files) > 1 else None)
