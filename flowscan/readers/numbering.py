"""Round numbers from file and folder names (`3checkpoint.pth.tar`, `round_7.safetensors`)."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path

from flowscan.errors import ScanError

_LAST_NUMBER = re.compile(r"^(.*?)(\d+)(\D*)$")
_SUFFIXES = (".pth.tar", ".safetensors", ".pth", ".pt", ".tar", ".npz", ".bin", ".ckpt", ".msgpack",
             ".weights.h5", ".h5", ".hdf5", ".keras")
# HF Trainer folders count optimizer steps, not rounds: their order gives the round.
_STEP_NAMED = re.compile(r"^checkpoint-\d+$")
# Folders that name a run (a seed, a replicate, a setting), never a round, in any layout whose rounds
# are folders: `seed_0/`, `replicate_1/`, `lr_0.1/`, `run3/`.
_RUN_NAMED = re.compile(r"^(seed|seeds|replicate|rep|run|trial|lr|wd|exp|experiment|task|fold|sweep|job|"
                        r"config|cfg|variant|version|width|depth)[_\-=]?[-+]?[\d.e]+$", re.IGNORECASE)


def is_run_name(name: str) -> bool:
    """True for folder names that number runs (seeds, replicates, settings), not rounds."""
    return bool(_RUN_NAMED.match(name))


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
    (`round_{n}.h5`), numbered by `numbers_or_ranks`."""
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
    numbered, note = numbers_or_ranks(numbered)
    if note:
        notes.append(note)
    return [Round(n, reader, (p,)) for n, p in numbered], notes


def numbers_or_ranks(numbered: list[tuple[int, Path]]) -> tuple[list[tuple[int, Path]], str | None]:
    """Round numbers from the numbers in file names. Numbered 0, 1, 2, ... they are the rounds.
    Otherwise the numbers count steps (150, 300, 450: saved every 150 steps) or start above 0 (1, 2,
    3): round = (number - first) / the common step, so a step missing inside the run stays a missing
    round (150, 300, 600 -> rounds 0, 1, 3), never closed up silently."""
    numbers = [n for n, _ in numbered]
    if not numbers or numbers == list(range(len(numbers))):
        return numbered, None
    first = numbers[0]
    step = math.gcd(*(n - first for n in numbers)) or 1
    shown = ", ".join(str(n) for n in numbers[:6]) + (", ..." if len(numbers) > 6 else "")
    note = (f"round = (number - {first}) / {step} of the numbered files ({shown})" if step > 1
            else f"round = number - {first} of the numbered files ({shown})") if first or step > 1 else None
    return [((n - first) // step, p) for n, p in numbered], note
