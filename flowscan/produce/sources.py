"""Masks and weights taken from another archive, fitted to the model being trained.

`ARCHIVE[:ROUND]` names them: ARCHIVE is any folder flowscan reads (one run, or several, of
which the one for the seed is taken: see `pick_run`), ROUND a round index or `last`. Tensors are
matched by canonical name and shape; whatever does not match is listed in one error, unless
the caller lets unmatched tensors be filled (`fill_unmatched`): see `fit_masks`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flowscan import layout
from flowscan.errors import FlowscanError, ScanError
from flowscan.produce import tickets
from flowscan.readers.base import NameOptions, Round, Run
from flowscan.readers.discover import discover
from flowscan.reduce import open_tensors

REWIND_FILE = "rewind.safetensors"   # the rewind point `produce` keeps beside a run's rounds
_SEED_NAME = re.compile(r"(?:^|/)(?:seed|replicate|rep|run)[_\-]?(\d+)$", re.IGNORECASE)


@dataclass(frozen=True)
class ArchiveRef:
    """`ARCHIVE[:ROUND]` as given on the command line."""

    path: Path
    round: int | str | None = None     # an index, "last", or None (the caller's default)

    @classmethod
    def parse(cls, text: str) -> "ArchiveRef":
        head, sep, tail = text.rpartition(":")
        if sep and (tail.isdigit() or tail == "last") and head:
            return cls(Path(head), int(tail) if tail.isdigit() else tail)
        return cls(Path(text))


@dataclass
class Picked:
    """One run of an archive chosen for a seed, and the notes on how."""

    run: Run
    notes: list[str] = field(default_factory=list)


def runs_of(path: Path, format: str | None = None) -> list[Run]:
    if not Path(path).is_dir():
        raise FlowscanError(f"{path}: not a folder (expected an archive flowscan reads)")
    runs = discover(Path(path), format)
    readable = [r for r in runs if not r.error]
    if not readable:
        details = "; ".join(r.error for r in runs if r.error)
        raise FlowscanError(f"{path}: no readable IMP run found" + (f" ({details})" if details else ""))
    return readable


def run_seed_of(run: Run) -> int | None:
    """The seed of a run: produce's manifest, else a seed_N / replicate_N folder name."""
    seed = (layout.run_args(run.path) or {}).get("seed")
    if isinstance(seed, int):
        return seed
    m = _SEED_NAME.search(run.name if run.name != "." else run.path.name)
    return int(m.group(1)) if m else None


def pick_run(runs: list[Run], seed: int, what: str) -> Picked:
    """The run for `seed`: the only one, else the one with that seed, else the seed-th (cyclically)."""
    if len(runs) == 1:
        return Picked(runs[0])
    same = [r for r in runs if run_seed_of(r) == seed]
    if len(same) == 1:
        return Picked(same[0])
    chosen = runs[seed % len(runs)]
    return Picked(chosen, [f"{what}: no run with seed {seed} among {len(runs)}; used {chosen.name} "
                           f"(run {seed % len(runs)} in path order)"])


def find_round(run: Run, wanted: int | str | None) -> Round:
    if wanted is None or wanted == "last":
        return run.rounds[-1]
    for rnd in run.rounds:
        if rnd.index == wanted:
            return rnd
    raise FlowscanError(f"{run.path}: no round {wanted} (rounds: {', '.join(str(r.index) for r in run.rounds)})")


@dataclass
class RoundTensors:
    """A round's canonical tensors: weights (lazy views unless copied), and masks (bool) where stored."""

    weights: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]


def read_round(rnd: Round, names: NameOptions = NameOptions(), copy_weights: bool = False) -> RoundTensors:
    """A round's masks, and its weights as lazy views (their shapes are what fitting masks
    needs); `copy_weights` reads the weights into memory (to train from them)."""
    try:
        refs, _, _ = open_tensors(rnd, names)
        found, masks = {}, {}
        for ref in refs:
            found[ref.name] = np.array(ref.weight) if copy_weights else ref.weight
            if ref.mask is not None:
                mask = np.asarray(ref.mask)
                if not np.isin(mask, (0, 1)).all():
                    raise ScanError(ref.mask_path or ref.path, "mask holds values other than 0 and 1",
                                    tensor=ref.name)
                masks[ref.name] = mask != 0
    except ScanError as exc:
        raise FlowscanError(str(exc)) from None
    return RoundTensors(found, masks)


def rewind_state(run: Run) -> dict[str, np.ndarray]:
    """The rewind point of a run `produce` wrote (its rewind.safetensors)."""
    from flowscan.io import safetensors_file

    path = run.path / REWIND_FILE
    if not path.is_file():
        raise FlowscanError(f"{run.path}: no {REWIND_FILE} (only `flowscan produce` archives keep their rewind "
                            "point); name a round instead: ARCHIVE:ROUND")
    try:
        tensors, _ = safetensors_file.load(path)
    except ScanError as exc:
        raise FlowscanError(str(exc)) from None
    return {k: np.array(v) for k, v in tensors.items()}


def _listing(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


@dataclass
class Fitted:
    """Masks fitted to a model: bool arrays keyed by the model's prunable names."""

    masks: dict[str, np.ndarray]
    notes: list[str] = field(default_factory=list)
    filled: list[str] = field(default_factory=list)    # tensors without a usable source mask


def fit_masks(source: RoundTensors, shapes: dict[str, tuple[int, ...]], where: str,
              fill_unmatched: bool = False, rng: np.random.Generator | None = None) -> Fitted:
    """The source round's masks for the prunable tensors `shapes` (name -> shape).

    A prunable tensor the source stores without a mask was left dense there: its mask is all
    ones (noted). Any other difference is an error that lists every one: a prunable tensor the
    source lacks or holds with another shape, or a source mask on a tensor the model does not
    prune. With `fill_unmatched`, a prunable tensor of another shape gets a random mask with the
    source tensor's density and a missing one stays dense (noted; masks of unprunable tensors are
    then ignored)."""
    missing, reshaped, extra, dense, masks, filled = [], [], [], [], {}, []
    rng = rng or np.random.default_rng(0)
    for name, shape in shapes.items():
        shape = tuple(shape)
        if name not in source.weights:
            missing.append(name)
            if fill_unmatched:
                masks[name] = np.ones(shape, dtype=bool)
                filled.append(name)
            continue
        have = tuple(source.weights[name].shape)
        if have != shape:
            reshaped.append(f"{name} {list(have)} vs {list(shape)}")
            if fill_unmatched:
                kept = source.masks[name].mean() if name in source.masks else 1.0
                masks[name] = tickets.random_global({name: shape}, int(round(kept * int(np.prod(shape)))), rng)[name]
                filled.append(name)
            continue
        if name in source.masks:
            masks[name] = source.masks[name].reshape(shape).copy()
        else:
            dense.append(name)
            masks[name] = np.ones(shape, dtype=bool)
    extra = [n for n in source.masks if n not in shapes]
    problems = []
    if missing:
        problems.append(f"missing in the source: {_listing(missing)}")
    if reshaped:
        problems.append(f"other shapes: {_listing(reshaped)}")
    if extra and not fill_unmatched:
        problems.append(f"masked in the source but not prunable here: {_listing(extra)}")
    if problems and not fill_unmatched:
        raise FlowscanError(f"{where}: its masks do not fit the model ({'; '.join(problems)}); "
                            "check --model/--exclude, --select/--strip-model-prefix, or fill the "
                            "differing tensors with --fill-unmatched")
    notes = []
    if dense:
        notes.append(f"{where}: no mask stored for {_listing(dense)}: kept dense as in the source")
    if problems:
        notes.append(f"{where}: filled ({'; '.join(problems)}): random masks at the source tensor's density "
                     "for other shapes, dense for missing tensors")
    return Fitted(masks, notes, filled)


def fit_state(own: dict[str, np.ndarray], other: dict[str, np.ndarray], where: str,
              keep_unmatched: bool = False) -> tuple[dict[str, np.ndarray], list[str]]:
    """The model's state (`own`, every key) with values taken from `other` by name and shape.
    Every tensor must be matched (a BatchNorm step counter may be absent) unless
    `keep_unmatched`; then unmatched ones keep their own values. Returns (state, notes)."""
    state, missing, reshaped = {}, [], []
    for name, value in own.items():
        theirs = other.get(name)
        if theirs is None:
            if not name.endswith("num_batches_tracked"):
                missing.append(name)
            state[name] = value
        elif tuple(theirs.shape) != tuple(value.shape) and not (np.size(theirs) == np.size(value) == 1):
            # (a scalar stored as [1] fits: earlier flowscan archives hold BatchNorm step counters so)
            reshaped.append(f"{name} {list(theirs.shape)} vs {list(value.shape)}")
            state[name] = value
        else:
            state[name] = np.asarray(theirs, dtype=value.dtype).reshape(value.shape).copy()
    problems = ([f"missing: {_listing(missing)}"] if missing else []) + \
               ([f"other shapes: {_listing(reshaped)}"] if reshaped else [])
    if problems and not keep_unmatched:
        raise FlowscanError(f"{where}: its weights do not fit the model ({'; '.join(problems)})")
    notes = [f"{where}: kept this model's own values for ({'; '.join(problems)})"] if problems else []
    return state, notes
