"""Orbax checkpoints, one step folder per round (JAX pruning code).

    run/<step>/_METADATA                  StandardCheckpointer().save(run / str(step), tree)
    run/<step>/default/_METADATA          CheckpointManager(run).save(step, ...) (item "default")
    run/<prefix>_<step>/<item>/_METADATA  other step prefixes and item names

The tree is read from `_METADATA` and the arrays through tensorstore (`io/orbax_store.py`); the
weights, masks and names follow the Flax rules (`flax_msgpack.split`): the `params` tree, and a
parallel `masks`/`mask` tree beside it or in the optimizer state. Items of a step are merged
(`default` and `state` at the top, others under their names), so a `params` item with a `masks`
item works too. Rounds are the step numbers when they are 0, 1, 2, ..., else their rank.
A step is complete when orbax committed it: its `commit_success.txt` marker (written by orbax on
every save, on local file systems too) where the run's steps carry markers at all; unfinished saves
(`*.orbax-checkpoint-tmp-*`) and steps without the marker are incomplete rounds. Folders that name
runs (`seed_0/`, `replicate_1/`) are never steps, and neither is a folder whose items are step folders
(`seed_0/{0,1,2}/` is a run of its own).
"""

from __future__ import annotations

import re
from pathlib import Path

from flowscan.errors import ScanError
from flowscan.io import orbax_store
from flowscan.readers.base import RawRound, Reader, Round
from flowscan.readers.flax_msgpack import split
from flowscan.readers.numbering import is_run_name, rounds_of_numbered_files
from flowscan.readers.registry import register

_STEP = re.compile(r"^(?:[A-Za-z][\w\-]*_)?\d+$")
_UNFINISHED = re.compile(r"^((?:[A-Za-z][\w\-]*_)?\d+)\.orbax-checkpoint-tmp-\d*$")
COMMIT_MARKER = "commit_success.txt"
TOP_ITEMS = ("default", "state")


def _items(step: Path) -> list[Path]:
    """The folders of a step that hold an Orbax tree (the step itself, or its items, which are
    never step folders themselves: those would make `step` a run)."""
    if (step / orbax_store.METADATA).is_file():
        return [step]
    return sorted(c for c in step.iterdir() if c.is_dir() and not _STEP.match(c.name)
                  and (c / orbax_store.METADATA).is_file())


def _steps(folder: Path) -> list[Path]:
    return sorted(c for c in folder.iterdir()
                  if _STEP.match(c.name) and not is_run_name(c.name) and c.is_dir() and _items(c))


def _unfinished(folder: Path) -> list[Path]:
    """Saves orbax has not finished (its temporary folders), named as their step would be."""
    return [c for c in folder.iterdir() if _UNFINISHED.match(c.name) and c.is_dir()]


def _files(item: Path) -> tuple[Path, ...]:
    """The files whose change means a new round: the metadata and the OCDBT manifest."""
    manifest = item / "manifest.ocdbt"
    return (item / orbax_store.METADATA,) + ((manifest,) if manifest.is_file() else ())


@register
class OrbaxReader(Reader):
    name = "orbax"
    description = "Orbax step folders (StandardCheckpointer, CheckpointManager), masks as a parallel tree"
    needs = ("tensorstore",)

    def guess_can_open(self, folder: Path) -> bool:
        return bool(_steps(folder))

    def rounds(self, folder: Path):
        steps = _steps(folder)
        unfinished = {folder / _UNFINISHED.match(c.name).group(1): c for c in _unfinished(folder)}
        candidates = steps + [s for s in unfinished if s not in set(steps)]
        rounds, notes = rounds_of_numbered_files(candidates, self.name, folder, "Orbax step")
        marked = any((s / COMMIT_MARKER).is_file() for s in steps)
        out = []
        for rnd in rounds:
            step = rnd.files[0]
            if step in unfinished and step not in set(steps):
                out.append(Round(rnd.index, self.name, (unfinished[step],),
                                 incomplete=f"{unfinished[step]}: orbax has not finished this save"))
                continue
            items = _items(step)
            files = tuple(f for item in items for f in _files(item))
            why = f"{step}: no {COMMIT_MARKER} (orbax has not committed this step)" \
                if marked and not (step / COMMIT_MARKER).is_file() else ""
            out.append(Round(rnd.index, self.name, files, spec=tuple(items), incomplete=why))
        return out, notes

    def open_round(self, round: Round) -> RawRound:
        items = list(round.spec)
        tree: dict = {}
        for item in items:
            sub = orbax_store.tree(item)
            if len(items) == 1 or item.name in TOP_ITEMS:
                for key, value in sub.items():
                    if key in tree:
                        raise ScanError(item, f"key {key!r} is in two items of this step")
                    tree[key] = value
            else:
                tree[item.name] = sub
        where = items[0] if len(items) == 1 else items[0].parent
        weights, masks = split(tree, where, is_array=orbax_store.is_array)
        return RawRound(weights, where, masks or None, where if masks else None)
