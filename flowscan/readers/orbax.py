"""Orbax checkpoints, one step folder per round (JAX pruning code).

    run/<step>/_METADATA                  StandardCheckpointer().save(run / str(step), tree)
    run/<step>/default/_METADATA          CheckpointManager(run).save(step, ...) (item "default")
    run/<prefix>_<step>/<item>/_METADATA  other step prefixes and item names

The tree is read from `_METADATA` and the arrays through tensorstore (`io/orbax_store.py`); the
weights, masks and names follow the Flax rules (`flax_msgpack.split`): the `params` tree, and a
parallel `masks`/`mask` tree beside it or in the optimizer state. Items of a step are merged
(`default` and `state` at the top, others under their names), so a `params` item with a `masks`
item works too. Rounds are the step numbers when they are 0, 1, 2, ..., else their rank.
Unfinished saves (`*.orbax-checkpoint-tmp-*`) are skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

from flowscan.errors import ScanError
from flowscan.io import orbax_store
from flowscan.readers.base import RawRound, Reader, Round
from flowscan.readers.flax_msgpack import split
from flowscan.readers.numbering import rounds_of_numbered_files
from flowscan.readers.registry import register

_STEP = re.compile(r"^(?:[A-Za-z][\w\-]*_)?\d+$")
TOP_ITEMS = ("default", "state")


def _items(step: Path) -> list[Path]:
    """The folders of a step that hold an Orbax tree (the step itself, or its items)."""
    if (step / orbax_store.METADATA).is_file():
        return [step]
    return sorted(c for c in step.iterdir() if c.is_dir() and (c / orbax_store.METADATA).is_file())


def _steps(folder: Path) -> list[Path]:
    return sorted(c for c in folder.iterdir() if _STEP.match(c.name) and c.is_dir() and _items(c))


def _files(item: Path) -> tuple[Path, ...]:
    """The files whose change means a new round: the metadata and the OCDBT manifest."""
    manifest = item / "manifest.ocdbt"
    return (item / orbax_store.METADATA,) + ((manifest,) if manifest.is_file() else ())


@register
class OrbaxReader(Reader):
    name = "orbax"
    description = ("Orbax step folders (StandardCheckpointer, CheckpointManager), masks as a parallel tree "
                   "(needs tensorstore: pip install 'flowscan[orbax]')")

    def guess_can_open(self, folder: Path) -> bool:
        return bool(_steps(folder))

    def rounds(self, folder: Path):
        steps = _steps(folder)
        rounds, notes = rounds_of_numbered_files(steps, self.name, folder, "Orbax step")
        out = []
        for rnd in rounds:
            step = rnd.files[0]
            items = _items(step)
            files = tuple(f for item in items for f in _files(item))
            out.append(Round(rnd.index, self.name, files, spec=tuple(items)))
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
