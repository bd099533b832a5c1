"""Round numbers from file and folder names (`3checkpoint.pth.tar`, `round_7.safetensors`)."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from flowscan.errors import ScanError

_LAST_NUMBER = re.compile(r"^(.*?)(\d+)(\D*)$")
_SUFFIXES = (".pth.tar", ".safetensors", ".pth", ".pt", ".tar", ".npz", ".bin", ".ckpt", ".msgpack",
             ".weights.h5", ".h5", ".hdf5", ".keras")
# HF Trainer folders count optimizer steps, not rounds: their order gives the round.
_STEP_NAMED = re.compile(r"^checkpoint-\d+$")


def stem(name: str) -> str:
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def pattern_and_number(name: str) -> tuple[str, int] | None:
    """('{n}checkpoint', 3) for '3checkpoint.pth.tar'; None when the name has no number."""
    m = _LAST_NUMBER.match(stem(name))
    if not m:
        return None
    suffix = name[len(stem(name)):]
    return f"{m.group(1)}{{n}}{m.group(3)}{suffix}", int(m.group(2))


def numbered_groups(paths: list[Path]) -> dict[str, list[tuple[int, Path]]]:
    """Paths grouped by name pattern, each group sorted by its number."""
    groups: dict[str, list[tuple[int, Path]]] = defaultdict(list)
    for path in paths:
        found = pattern_and_number(path.name)
        if found:
            groups[found[0]].append((found[1], path))
    return {k: sorted(v) for k, v in groups.items()}


def unique_rounds(numbered: list[tuple[int, Path]], what: str = "round") -> list[tuple[int, Path]]:
    """`numbered` sorted by number; two paths with one number (`round_2`, `round_02`) are an
    error naming both, never a silent pick."""
    numbered = sorted(numbered, key=lambda item: (item[0], str(item[1])))
    for (n, a), (m, b) in zip(numbered, numbered[1:]):
        if n == m:
            raise ScanError(a.parent, f"{a.name} and {b.name} are both {what} {n}: which one is meant? "
                                      "(move one away)")
    return numbered


def as_rounds(numbered: list[tuple[int, Path]]) -> tuple[list[tuple[int, Path]], str | None]:
    """Round index per path: the number itself, or the rank for step-numbered folders."""
    if numbered and all(_STEP_NAMED.match(p.name) for _, p in numbered):
        return [(rank, p) for rank, (_, p) in enumerate(numbered)], \
            "round = rank of the step-numbered checkpoint-N folders"
    return numbered, None


def rounds_of_numbered_files(files: list[Path], reader: str, folder: Path, what: str) -> tuple[list, list[str]]:
    """(Rounds, notes) for layouts of one file per round: the largest group of files named alike
    (`round_{n}.h5`), numbered 0, 1, 2, ... by their numbers, else by rank (step-numbered files)."""
    from flowscan.readers.base import Round

    groups = numbered_groups(files)
    if not groups:
        raise ScanError(folder, f"no numbered {what} files")
    chosen = max(groups, key=lambda k: (len(groups[k]), k))
    numbered = unique_rounds(groups[chosen])
    notes = [f"round files: {chosen.replace('{n}', '{round}')}"]
    others = sorted(set(groups) - {chosen})
    if others:
        notes.append("ignored: " + ", ".join(o.replace("{n}", "{round}") for o in others))
    if [n for n, _ in numbered] != list(range(len(numbered))):
        notes.append(f"round = rank of the numbered files ({', '.join(str(n) for n, _ in numbered[:6])}"
                     f"{', ...' if len(numbered) > 6 else ''} are steps)")
        numbered = [(rank, p) for rank, (_, p) in enumerate(numbered)]
    return [Round(n, reader, (p,)) for n, p in numbered], notes
