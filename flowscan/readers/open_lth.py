"""open_lth (Frankle et al.) and its forks (ElasticLTH, lth_diet).

A run is one `replicate_<r>/` folder; round L is `level_<L>/main/`, with `mask.pth` (0/1 int32
per prunable weight) and the trained weights in `model_ep{E}_it{I}.pth` at the training's final
step, which open_lth saves at the same step in every level; a level without that file (or without
its mask) is still training or was copied partly, and is an incomplete round, never read from its
rewind weights (lth_diet: `model_final.pt` + `mask.pt`; fallback where no level has model_ep files:
the resume `checkpoint.pth`). Sibling
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


def _model_steps(main: Path) -> list[tuple[tuple[int, int], Path]]:
    """(epoch, iteration) and file of each `model_ep{E}_it{I}.pth`, in step order."""
    return sorted((tuple(map(int, m.groups())), p) for p in main.iterdir() if (m := _MODEL.match(p.name)))


def _fallback_weights(main: Path) -> Path | None:
    """lth_diet's `model_final.pt`, else the resume `checkpoint.pth`."""
    return next((main / name for name in ("model_final.pt", "checkpoint.pth") if (main / name).is_file()), None)


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
        """A level is complete when it holds the model at the training's final step, the same step
        for every level (the highest step any level saved), and its mask (from level 1 on)."""
        levels = [(level, main, _model_steps(main)) for level, main in _levels(folder)]
        final = max((steps[-1][0] for _, _, steps in levels if steps), default=None)
        rounds, notes = [], []
        for level, main, steps in levels:
            mask = next((main / m for m in _MASK_FILES if (main / m).is_file()), None)
            if steps:
                weights = steps[-1][1] if steps[-1][0] == final else None
                missing = f"model_ep{final[0]}_it{final[1]}.pth"
            else:  # model_final.pt (lth_diet) or the resume checkpoint, where no level has model_ep files
                weights = _fallback_weights(main) if final is None else None
                missing = "model_ep*_it*.pth" if final is None else f"model_ep{final[0]}_it{final[1]}.pth"
            why = ""
            if weights is None:
                why = f"{main}: no {missing} (the trained weights) yet"
            elif mask is None and level > 0:
                why = f"{main}: no mask.pth yet"
            files = ((weights,) if weights else ()) + ((mask,) if mask else ())
            metrics = read_logger(main / "logger") if not why and (main / "logger").is_file() else {}
            rounds.append(Round(level, self.name, files, (), metrics, incomplete=why))
        if final is not None:
            notes.append(f"weights: model_ep{final[0]}_it{final[1]}.pth (the final step, the same for every level)")
        elif rounds:
            notes.append(f"weights: {rounds[-1].files[0].name} per level" if rounds[-1].files else "no weights")
        return rounds, notes

    def open_round(self, round: Round) -> RawRound:
        return open_torch_round(round.files[0], round.files[1] if len(round.files) > 1 else None)
