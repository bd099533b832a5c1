"""Ticket transfer: train a source archive's tickets on a target task, beside the baselines that
make the result mean something (Redman et al.'s universality prediction, tested).

For every seed s and chosen source round r (its ticket S at density d):

    transferred              S, trained from the target's own rewind point
    transferred_source_init  S, trained from the source's rewind point (where shapes allow)
    own                      the target's own ticket at the round closest in density to d
    random_global            as many weights as S, uniform over all prunable weights
    random_layer             as many weights as S in every tensor, at random positions
    shuffled                 S permuted within each output unit (optional; see tickets.py)

Every arm trains with the target's recipe (its `produce` manifest, or the source's with the
target's data when the target is a dataset: then its own tickets are made here first, by IMP).
Each trained cell is one JSON file written atomically, so an interrupted transfer resumes
where it stopped; the tables are rebuilt from every cell under OUT/transfer-runs/ (every pair
run into OUT), see stats/transfer.py.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from flowscan import layout
from flowscan.errors import FlowscanError
from flowscan.io.atomic import write_text
from flowscan.produce import sources, tickets
from flowscan.produce.imp import IMPConfig, Session, numpy_state, run_seed
from flowscan.stats.transfer import ARMS, DEFAULT_ARMS

CELLS = "transfer-runs"        # OUT/transfer-runs/<pair>/...: one JSON per trained cell
TARGETS = "transfer-targets"   # OUT/transfer-targets/<name>/seed_N: target tickets made here


@dataclass(frozen=True)
class Recipe:
    """Overrides of the training recipe, for a target that is a dataset (made here)."""

    model: str | None = None
    epochs: float | None = None
    lr: float | None = None
    batch_size: int | None = None
    rewind: float | None = None

    def given(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Plan:
    source: Path
    target: str                                 # an archive folder, or a dataset NAME[:ARG]
    rounds: tuple[int, ...] | None = None       # source rounds (None: up to 3 spread to the last)
    seeds: tuple[int, ...] | None = None        # None: the target archive's seeds, else (0,)
    arms: tuple[str, ...] = DEFAULT_ARMS
    recipe: Recipe = Recipe()
    fill_unmatched: bool = False
    format: str | None = None                   # reader of the source archive
    blocks: tuple[str, ...] = ()                # block rules for the sigma distance (default: detect)

    @property
    def target_is_archive(self) -> bool:
        return Path(self.target).is_dir()


def label_of(path_or_spec: str | Path) -> str:
    """How a side of a pair is named in the tables: the archive folder, or the dataset name."""
    p = Path(path_or_spec)
    if p.is_dir():
        return p.resolve().name
    return str(path_or_spec).partition(":")[0]


def pair_label(plan: Plan) -> tuple[str, str]:
    return label_of(plan.source), label_of(plan.target)


def _slug(text: str) -> str:
    from flowscan.plot.figures import slug

    return slug(text)


def default_rounds(last: int) -> tuple[int, ...]:
    """Up to three source rounds spread evenly to the last one (round 0 is dense: no ticket)."""
    return tuple(sorted({max(1, round(last * k / 3)) for k in (1, 2, 3)})) if last >= 1 else ()


def _config(args: dict, where: Path) -> IMPConfig:
    args = {k: v for k, v in args.items() if k != "seed" and k in IMPConfig.__dataclass_fields__}
    try:
        return IMPConfig(**args)
    except TypeError as exc:
        raise FlowscanError(f"{where / layout.RUN_MANIFEST}: not a produce recipe ({exc})") from None


@dataclass
class Side:
    """One side of the pair, prepared: its runs, and the target's recipe."""

    path: Path
    runs: list
    cfg: IMPConfig | None = None


def prepare(plan: Plan, out: Path, device: torch.device, notes: Callable[[str], None],
            progress=None, compile: bool = True) -> tuple[Side, Side, list[int], tuple[int, ...]]:
    """(source, target, seeds, source rounds): resolves the target's recipe and, for a target
    given as a dataset, makes its own tickets by IMP (resuming what is there)."""
    from flowscan.train.data import load

    for arm in plan.arms:
        if arm not in ARMS:
            raise FlowscanError(f"unknown arm {arm!r}; known: {', '.join(ARMS)}")
    source = Side(plan.source, sources.runs_of(plan.source, plan.format))
    source_args = layout.run_args(source.runs[0].path)
    last = min(r.rounds[-1].index for r in source.runs)
    rounds = plan.rounds if plan.rounds is not None else default_rounds(last)
    if not rounds:
        raise FlowscanError(f"{plan.source}: only round 0 (dense): no ticket to transfer")
    for run in source.runs:
        have = {r.index for r in run.rounds}
        lacking = [r for r in rounds if r not in have]
        if lacking:
            raise FlowscanError(f"{run.path}: no round {', '.join(map(str, lacking))} "
                                f"(rounds: {', '.join(str(i) for i in sorted(have))})")
    if plan.target_is_archive:
        if plan.recipe.given():
            raise FlowscanError(f"{plan.target} is an archive: its own `produce` manifest gives the recipe "
                                f"(drop {', '.join('--' + k.replace('_', '-') for k in plan.recipe.given())})")
        target = Side(Path(plan.target), sources.runs_of(Path(plan.target)))
        args = [layout.run_args(r.path) for r in target.runs]
        if any(a is None for a in args):
            bad = next(r for r, a in zip(target.runs, args) if a is None)
            raise FlowscanError(f"{bad.path}: not written by `flowscan produce`: a target archive needs its "
                                "recipe and rewind point; give the target as a dataset (NAME[:ARG]) instead")
        target.cfg = _config(args[0], target.runs[0].path)
        found = sorted({a["seed"] for a in args if isinstance(a.get("seed"), int)})
        seeds = list(plan.seeds) if plan.seeds is not None else found or [0]
        return source, target, seeds, tuple(rounds)
    if source_args is None and not plan.recipe.model:
        raise FlowscanError(f"{plan.source} was not written by `flowscan produce`: name the target's model "
                            "with --model (and its recipe: --epochs, --lr, ...)")
    base = (_config(source_args, source.runs[0].path) if source_args
            else IMPConfig(model=plan.recipe.model, data=plan.target, rounds=1))
    smallest = min(_source_density(run, r) for run in source.runs for r in rounds)
    cfg = replace(base, data=plan.target, rounds=max(rounds) + 1, target_density=smallest * (1 + 1e-9),
                  mask_from=None, init_from=None, fill_unmatched=False, **plan.recipe.given())
    seeds = list(plan.seeds) if plan.seeds is not None else [0]
    folder = out / TARGETS / _slug(f"{cfg.model}-{label_of(plan.target)}")
    data = load(cfg.data).to(device)
    for seed in seeds:
        notes(f"target tickets: IMP on {plan.target}, seed {seed} -> {folder / f'seed_{seed}'}")
        run_seed(cfg, seed, folder / f"seed_{seed}", data, device, compile=compile, progress=progress)
    return source, Side(folder, sources.runs_of(folder), cfg), seeds, tuple(rounds)


def _source_density(run, index: int) -> float:
    rnd = sources.find_round(run, index)
    masks = sources.read_round(rnd).masks
    return tickets.density(masks) if masks else 1.0


def _cell_path(out: Path, pair: str, arm: str, seed: int, rnd: int) -> Path:
    return out / CELLS / pair / arm / f"seed_{seed}" / f"round_{rnd:04d}.json"


def _check_pair_manifest(folder: Path, args: dict) -> None:
    """Cells of one pair must come from one configuration: resume, never mix."""
    path = folder / "transfer.json"
    if path.is_file() and any(folder.rglob("round_*.json")):
        diff = layout.args_difference(layout.read_json(path), args)
        if diff:
            raise FlowscanError(f"{folder} holds a transfer made with other settings ({diff}); use another "
                                "output folder, or the same settings to resume")
        return
    write_text(path, json.dumps(args, indent=2, sort_keys=True))


def _rng(seed: int, rnd: int, arm: str) -> np.random.Generator:
    # a function of the cell alone: a resumed transfer draws the very same random masks
    digest = hashlib.sha256(f"{seed}/{rnd}/{arm}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _densities(run) -> dict[int, float]:
    """Ticket density of every round of a run (masks only)."""
    out = {}
    for rnd in run.rounds:
        masks = sources.read_round(rnd).masks
        out[rnd.index] = tickets.density(masks) if masks else 1.0
    return out


def _nearest(densities: dict[int, float], density: float) -> int:
    """The round whose ticket density is closest to `density` (the denser on a tie)."""
    return min(densities, key=lambda i: (abs(densities[i] - density), -densities[i]))


def run_transfer(plan: Plan, out: Path, device: torch.device, notes: Callable[[str], None] = lambda s: None,
                 progress=None, compile: bool = True) -> Path:
    """Train every missing cell of the pair into OUT/transfer-runs/<pair>/; returns that folder."""
    from flowscan.train.data import load

    out = Path(out)
    source, target, seeds, rounds = prepare(plan, out, device, notes, progress, compile)
    source_label, target_label = pair_label(plan)
    pair = _slug(f"{source_label}-to-{target_label}")
    folder = out / CELLS / pair
    cfg = target.cfg
    manifest = {"source": str(plan.source.resolve()), "target": str(Path(plan.target).resolve())
                if plan.target_is_archive else plan.target, "source_label": source_label,
                "target_label": target_label, "recipe": asdict(cfg), "fill_unmatched": plan.fill_unmatched,
                "format": plan.format}
    _check_pair_manifest(folder, manifest)
    data = load(cfg.data).to(device)
    for seed in seeds:
        todo = [(r, a) for r in rounds for a in plan.arms if not _cell_path(out, pair, a, seed, r).is_file()]
        if not todo:
            continue
        session = Session(cfg, seed, data, device, compile)
        target_run = sources.pick_run(target.runs, seed, "target")
        source_run = sources.pick_run(source.runs, seed, "source")
        for line in target_run.notes + source_run.notes:
            notes(line)
        own_rewind = sources.rewind_state(target_run.run)
        own_rewind, _ = sources.fit_state(numpy_state(session.model), own_rewind, f"{target_run.run.path} rewind point")
        source_rewind, source_note = _source_rewind(source_run.run, session, plan) \
            if "transferred_source_init" in plan.arms else (None, None)
        if source_note:
            notes(source_note)
        shapes = session.shapes()
        target_densities = _densities(target_run.run)
        for rnd in rounds:
            arms = [a for r, a in todo if r == rnd]
            if not arms:
                continue
            where = f"source {source_run.run.path} round {rnd}"
            fitted = sources.fit_masks(sources.read_round(sources.find_round(source_run.run, rnd)),
                                       shapes, where, plan.fill_unmatched, _rng(seed, rnd, "fill"))
            for line in fitted.notes:
                notes(line)
            ticket = fitted.masks
            density = tickets.density(ticket)
            own_index = _nearest(target_densities, density)
            own_round = sources.find_round(target_run.run, own_index)
            own = sources.fit_masks(sources.read_round(own_round), shapes,
                                    f"target {target_run.run.path} round {own_index}").masks
            own_density, own_metrics = target_densities[own_index], dict(own_round.metrics)
            common = {"source": source_label, "target": target_label, "seed": seed, "source_round": rnd,
                      "source_run": str(source_run.run.path), "target_run": str(target_run.run.path),
                      "ticket_density": density, "overlap": tickets.overlap(ticket, own),
                      "own_round": own_index, "own_density": own_density}
            for arm in arms:
                masks, rewind = _arm(arm, ticket, own, shapes, own_rewind, source_rewind, seed, rnd)
                if masks is None:
                    continue
                label = f"{pair} seed {seed} round {rnd} {arm}"
                bar = progress(label, session.start, session.total, session.per_epoch) if progress else None
                metrics, _ = session.train_round({k: torch.from_numpy(v) for k, v in masks.items()}, rewind, bar)
                cell = {**common, "arm": arm, "density": tickets.density(masks),
                        "init": "source" if arm == "transferred_source_init" else "target",
                        "metrics": metrics, "filled": fitted.filled}
                if arm == "own":
                    cell["recorded_accuracy"] = own_metrics.get("test_accuracy", math.nan)
                write_text(_cell_path(out, pair, arm, seed, rnd), json.dumps(cell, indent=1, sort_keys=True))
                notes(f"{label}: density {cell['density']:.4f}  test acc {metrics['test_accuracy']:.4f}")
    if not (folder / "sigma.json").is_file():
        notes(f"{pair}: sigma of both archives (a scan of each)")
        distance = sigma_distance(plan.source, target.path, plan.blocks, plan.format)
        for line in distance.notes:
            notes(line)
        write_sigma(folder, distance)
    return folder


def _source_rewind(run, session: Session, plan: Plan) -> tuple[dict | None, str | None]:
    try:
        state = sources.rewind_state(run)
        fitted, kept = sources.fit_state(numpy_state(session.model), state, f"{run.path} rewind point",
                                         keep_unmatched=plan.fill_unmatched)
    except FlowscanError as exc:
        return None, f"arm transferred_source_init skipped: {exc}"
    return fitted, "; ".join(kept) or None


def _arm(arm: str, ticket, own, shapes, own_rewind, source_rewind, seed: int, rnd: int):
    """(masks, rewind state) an arm trains with; (None, None) when it cannot be made."""
    rng = _rng(seed, rnd, arm)
    if arm == "transferred":
        return ticket, own_rewind
    if arm == "transferred_source_init":
        return (ticket, source_rewind) if source_rewind is not None else (None, None)
    if arm == "own":
        return own, own_rewind
    if arm == "random_global":
        return tickets.random_global(shapes, tickets.kept(ticket), rng), own_rewind
    if arm == "random_layer":
        return tickets.random_per_tensor(ticket, rng), own_rewind
    return tickets.shuffled_per_unit(ticket, rng), own_rewind


# -- sigma of each side, for the join with `compare` ---------------------------------------------

@dataclass
class SigmaDistance:
    rms: float = math.nan
    n_shared_blocks: int = 0
    n_conflicts: int = 0
    conflict_blocks: str | None = None
    notes: list[str] = field(default_factory=list)


def sigma_distance(source: Path, target: Path, blocks: Sequence[str] = (), format: str | None = None) -> SigmaDistance:
    """The pair's distance as `compare` measures it: RMS over shared blocks of the archives'
    sigma (each archive's runs pooled as one experiment), and the relevance conflicts."""
    import polars as pl

    from flowscan import pipeline, tables
    from flowscan.blocks import BlockRules
    from flowscan.stats.aggregate import aggregate
    from flowscan.stats.compare import compare, sigma_table
    from flowscan.stats.groups import Grouping

    rules = BlockRules.parse(blocks)
    frames, notes = [], []
    # the sides are units "source" and "target": two archives may well share a folder name
    for path, label, fmt in ((source, "source", format), (target, "target", None)):
        results = pipeline.analyze(Path(path), pipeline.Options(blocks=rules, format=fmt))
        t = tables.build_tables(results)
        ok = t["runs"].filter(pl.col("status") == "ok")["run"].to_list()
        if not ok:
            notes.append(f"{path}: no run could be analysed: no sigma distance")
            return SigmaDistance(notes=notes)
        grouping = Grouping(mapping={run: {"experiment": label} for run in ok})
        frames.append(sigma_table(aggregate(t["eigen"], t["runs"], t["steps"], grouping), "experiment"))
    pairs, _ = compare(pl.concat(frames))
    row = pairs.row(0, named=True)
    return SigmaDistance(row["rms"], row["n_shared_blocks"], row["n_conflicts"], row["conflict_blocks"], notes)


def write_sigma(folder: Path, distance: SigmaDistance) -> None:
    write_text(folder / "sigma.json", json.dumps(asdict(distance), indent=1))
