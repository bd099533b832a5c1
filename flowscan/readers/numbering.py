"""Round numbers from file and folder names (`3checkpoint.pth.tar`, `round_7.safetensors`).

A name may carry several numbers: PyTorch Lightning writes `epoch=3-step=120.ckpt`, Keras
`weights.03-0.45.h5` (epoch, then the validation loss), others `round_2_epoch_9.pt`. Files are
grouped by their name with every number taken out; within a group, the number that orders the
rounds is chosen by what the name calls it — a round (`round`, `level`, `prune`, `iter`,
`cycle`), else an epoch (one checkpoint per epoch is one pruning round, as Lightning's
`ModelPruning` does it), else a step, else the first number — among the integers that vary (a
decimal such as a loss is a metric, and a number that never changes, such as the 50 of
`resnet50_round_3.pt`, says nothing). The choice is said in the run's notes. Two numbers that
rank alike (both unnamed, say) and order the files differently are an error naming the files,
never a silent pick.
"""

from __future__ import annotations

import functools
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from flowscan.errors import ScanError

_LAST_NUMBER = re.compile(r"^(.*?)(\d+)(\D*)$")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_WORD_BEFORE = re.compile(r"([A-Za-z]+)[^A-Za-z0-9]*$")
_WORD_AFTER = re.compile(r"^[^A-Za-z0-9]*([A-Za-z]+)")
# what a number is called -> its rank as the round's number (lower first)
_ROUND_WORDS = {"round", "rounds", "level", "lvl", "prune", "pruning", "pruned", "iter", "iteration", "ite",
                "cycle", "imp", "lt"}
_EPOCH_WORDS = {"epoch", "epochs", "ep"}
_STEP_WORDS = {"step", "steps", "globalstep", "it", "batch"}
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


@dataclass
class NumberedGroup:
    """Files named alike, each with its round's number; `why` says which number that is when the
    names carry several, `conflict` why none can be chosen."""

    pattern: str                      # the names, the round's number as {n} and other numbers as {*}
    items: list[tuple[int, Path]]     # sorted by number
    why: str | None = None
    conflict: str | None = None

    def describe(self) -> str:
        """For a note: the first names (real ones, no placeholder) and which number is the round."""
        names = [p.name for _n, p in self.items[:3]] + (["..."] if len(self.items) > 3 else [])
        return ", ".join(names or [self.pattern]) + (f" ({self.why})" if self.why else "")


@functools.lru_cache(maxsize=4096)   # the runs of an archive repeat the same few names
def _slots(name: str) -> tuple[str, tuple[tuple[str, str], ...]] | None:
    """(template with each number as {}, [(word naming it, digits)]) of a name; None without numbers."""
    base = stem(name)
    found = list(_NUMBER.finditer(base))
    if not found:
        return None
    template, slots, at = "", [], 0
    for k, m in enumerate(found):
        template += base[at:m.start()] + "{}"
        before = _WORD_BEFORE.search(base[found[k - 1].end() if k else 0:m.start()])
        after = _WORD_AFTER.search(base[m.end():found[k + 1].start() if k + 1 < len(found) else len(base)])
        word = (before.group(1) if before else after.group(1) if after else "").lower()
        slots.append((word, m.group()))
        at = m.end()
    return template + base[at:] + name[len(base):], tuple(slots)


def _rank(word: str) -> int:
    word = word.replace("_", "")
    return 0 if word in _ROUND_WORDS else 1 if word in _EPOCH_WORDS else 2 if word in _STEP_WORDS else 3


def _group(template: str, named: list[tuple[Path, list[tuple[str, str]]]]) -> NumberedGroup:
    n_slots = len(named[0][1])
    varying = [k for k in range(n_slots)
               if "." not in named[0][1][k][1] and len({slots[k][1] for _p, slots in named}) > 1]
    if not varying:   # one file, or numbers that never change: the last integer, as one number would be
        ints = [k for k in range(n_slots) if "." not in named[0][1][k][1]]
        varying = ints[-1:] or [n_slots - 1]
    words = [named[0][1][k][0] for k in varying]
    best = min(_rank(w) for w in words)
    chosen = [k for k, w in zip(varying, words) if _rank(w) == best]
    pick = chosen[0]
    pieces = template.split("{}")
    pattern = pieces[0] + "".join(("{n}" if k == pick else "{*}") + piece for k, piece in enumerate(pieces[1:]))
    items = sorted((int(float(slots[pick][1])), path) for path, slots in named)
    why = conflict = None
    if len(varying) > 1:
        def called(k):
            word = named[0][1][k][0]
            return f"the number after '{word}'" if word else f"number {varying.index(k) + 1} of the name"
        orders = {k: [p for _n, p in sorted((int(slots[k][1]), str(p)) for p, slots in named)] for k in varying}
        disagree = [k for k in chosen[1:] if orders[k] != orders[pick]]
        if disagree:
            conflict = (f"the file names ({items[0][1].name}, {items[1][1].name}, ...) carry two numbers that "
                        f"order the files differently ({called(pick)} and {called(disagree[0])}), and neither "
                        "is named as the round (round_, level_, epoch=, ...): rename the files, or keep one "
                        "pattern per folder")
        same = all(orders[k] == orders[pick] for k in varying)
        why = (f"the round is {called(pick)}; " + ", ".join(called(k) for k in varying if k != pick)
               + (" orders them the same way" if same else " is ignored"))
    return NumberedGroup(pattern, items, why, conflict)


def group_files(paths: list[Path]) -> list[NumberedGroup]:
    """Paths grouped by name with their numbers taken out, each group numbered (module docstring)."""
    by_template: dict[str, list[tuple[Path, list[tuple[str, str]]]]] = defaultdict(list)
    for path in paths:
        found = _slots(path.name)
        if found:
            by_template[found[0]].append((path, found[1]))
    return [_group(template, named) for template, named in by_template.items()]


def numbered_groups(paths: list[Path]) -> dict[str, list[tuple[int, Path]]]:
    """Paths grouped by name pattern, each group sorted by its round's number."""
    return {g.pattern: g.items for g in group_files(paths)}


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

    groups = group_files(files)
    if not groups:
        raise ScanError(folder, f"no numbered {what} files")
    chosen = max(groups, key=lambda g: (len(g.items), g.pattern))
    numbered = unique_rounds(checked(chosen, folder).items)
    notes = [f"rounds from {what}s: {chosen.describe()}"]
    notes += ignored([g for g in groups if g is not chosen], files, groups)
    numbered, note = numbers_or_ranks(numbered)
    if note:
        notes.append(note)
    return [Round(n, reader, (p,)) for n, p in numbered], notes


def checked(group: NumberedGroup, folder: Path) -> NumberedGroup:
    """The group, or its conflict as the folder's named error."""
    if group.conflict:
        raise ScanError(folder, group.conflict)
    return group


def ignored(others: list[NumberedGroup], files: list[Path], groups: list[NumberedGroup]) -> list[str]:
    """Notes naming what a layout leaves out: other numbered families, and files without a number
    (Lightning's `last.ckpt` is a copy of the last epoch's checkpoint)."""
    notes = []
    if others:
        notes.append("ignored: " + ", ".join(g.describe() for g in sorted(others, key=lambda g: g.pattern)))
    numbered = {p for g in groups for _n, p in g.items}
    plain = sorted(p.name for p in files if p not in numbered)
    if plain:
        notes.append(f"ignored (no round number in the name): {', '.join(plain[:5])}" + (", ..." if len(plain) > 5 else "")
                     + (" (Lightning's copy of the latest checkpoint)" if "last.ckpt" in plain else ""))
    return notes


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
