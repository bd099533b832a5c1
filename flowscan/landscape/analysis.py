"""Tables of the landscape analyses for every run below a path (named as `analyze` names them)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import polars as pl
import torch

from flowscan.errors import FlowscanError
from flowscan.landscape import archive, hessian, recipes
from flowscan.landscape.selection import RoundSpec, select_runs
from flowscan.train import lmc
from flowscan.matching import is_matching
from flowscan.train.data import Dataset, load
from flowscan.readers.base import NameOptions, Run
from flowscan.readers.discover import discover

LMC_SCHEMA = {"run": pl.String, "round": pl.Int64, "alpha": pl.Float64, "error": pl.Float64, "loss": pl.Float64,
              "next_round": pl.Int64}
# instability comes after the decisions: beside the barrier it adds only (err(1) - err(0)) / 2 at
# most (docs/definitions.md), so it tracks "not matching" through that term, not through the path
SUMMARY_SCHEMA = {"run": pl.String, "round": pl.Int64, "next_round": pl.Int64, "span": pl.Int64,
                  "density": pl.Float64, "path": pl.String, "barrier": pl.Float64, "loss_barrier": pl.Float64,
                  "error_start": pl.Float64, "error_end": pl.Float64, "stored_error_start": pl.Float64,
                  "next_error": pl.Float64, "ends_differ": pl.Boolean,
                  "dense_error": pl.Float64, "tolerance": pl.Float64, "matching": pl.Boolean,
                  "instability": pl.Float64, "loss_instability": pl.Float64, "recipe": pl.String}
SHARPNESS_SCHEMA = {"run": pl.String, "round": pl.Int64, "density": pl.Float64, "lambda_max": pl.Float64,
                    "iterations": pl.Int64, "converged": pl.Boolean, "error": pl.Float64, "recipe": pl.String}
ACCURACY_TOLERANCE = 0.02   # |recorded - measured| test accuracy above which the setup is wrong


@dataclass(frozen=True)
class Setup:
    model: str | None = None     # flowscan model name or package.module:function; default from the manifest
    data: str | None = None
    device: str = "cpu"          # a torch device name ("auto" is resolved by the command)
    names: NameOptions = NameOptions()
    format: str | None = None
    accuracy_tolerance: float = ACCURACY_TOLERANCE
    runs: str | None = None      # --runs: a pattern on run names
    rounds: RoundSpec = RoundSpec()   # --rounds: which rounds


def runs_below(path: Path, setup: Setup) -> list[Run]:
    from flowscan.pipeline import no_runs_message

    found = discover(Path(path), setup.format)
    if not found:
        raise FlowscanError(no_runs_message(path, setup.format))
    runs = [r for r in found if not r.error]
    if not runs:
        raise FlowscanError(f"{path}: no readable IMP runs: {found[0].name}: {found[0].error}"
                            + (f" (and {len(found) - 1} more)" if len(found) > 1 else ""))
    return select_runs(runs, setup.runs, path)


def _model_and_data(run: Run, setup: Setup, cache: dict, shapes: dict,
                    progress: Callable[[str], None] | None) -> tuple[torch.nn.Module, Dataset, recipes.Recipe]:
    recipe, notes = recipes.recipe_for(run, setup.model, setup.data, shapes)
    if not recipe.model or not recipe.data:
        raise FlowscanError(f"{run.path}: name the model and data with --model and --data")
    device = torch.device(setup.device)
    key = (recipe.data, recipe.norm)
    if key not in cache:
        cache[key] = load(recipe.data, recipe.norm).to(device)
    data = cache[key]
    torch.manual_seed(0)
    model = archive.build_model(recipe.model, data.input_shape, data.n_classes).to(device)
    if progress:
        progress(f"{run.name}: {recipe.describe()}")
        for note in notes:
            progress(f"{run.name}: {note}")
    return model, data, recipe


def _density(masks: dict[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / total if total else float("nan")


def check_accuracy(run: Run, index: int, recorded: float | None, measured: float, recipe: recipes.Recipe,
                   tolerance: float, progress=None) -> None:
    """The test accuracy flowscan measures for a round against the one the archive recorded; beyond
    `tolerance` the model, data or preprocessing is not the network's, and nothing is computed."""
    if recorded is None:
        return
    if abs(measured - recorded) > tolerance:
        raise FlowscanError(
            f"{run.name} round {index}: the archive records test accuracy {recorded:.4f}, flowscan measures "
            f"{measured:.4f} ({recipe.describe()}), a difference above the tolerance {tolerance:g}: the model, "
            "the data or the preprocessing is not the one this network was trained with, so no landscape "
            "numbers were computed (--model/--data to correct it; --accuracy-tolerance to accept it)")
    if progress:
        progress(f"{run.name} round {index}: test accuracy {measured:.4f} measured, {recorded:.4f} recorded "
                 f"(within {tolerance:g})")


@dataclass
class LoadedRound:
    run: Run
    model: torch.nn.Module        # holding the round's masked weights and its own BatchNorm statistics
    data: Dataset
    index: int
    masks: dict[str, torch.Tensor]
    recipe: recipes.Recipe
    error: float                  # test error of the network as stored (see flowscan/matching.py)
    loss: float                   # its mean test loss
    previous: int | None          # the complete round before it in its run (None: the first)
    dense_error: float            # its run's dense error: round 0's, measured as stored; NaN without round 0


def _loaded_rounds(path: Path, setup: Setup, progress=None) -> Iterator[LoadedRound]:
    """Every round below `path` that --runs and --rounds select, loaded into its model one at a time,
    its test error measured as stored and checked against the accuracy its archive recorded. Round 0
    is loaded too, selected or not, for its run's dense error (flowscan/matching.py); a run without
    it, and every selected round not analysed (incomplete, missing), is named in a note."""
    cache: dict = {}
    for run in runs_below(path, setup):
        for index, why in sorted(run.incomplete.items()):
            if index in setup.rounds and progress:
                progress(f"{run.name}: round {index} is not analysed: {why}")
        wanted = {r.index for r in run.rounds if r.index in setup.rounds}
        if not wanted:
            if progress:
                progress(f"{run.name}: no complete round in --rounds {setup.rounds.text}: skipped")
            continue
        has_dense = bool(run.rounds) and run.rounds[0].index == 0
        if not has_dense and progress:
            progress(f"{run.name}: the run has no round 0 (its first complete round is {run.rounds[0].index}): "
                     "its dense error is unknown, so no round's matching is decided")
        previous = {r.index: p.index for p, r in zip(run.rounds, run.rounds[1:])}
        model = data = recipe = None
        dense_error = math.nan
        for rs in archive.iter_rounds(run, setup.names, wanted | ({0} if has_dense else set())):
            if model is None:
                shapes = {k: tuple(v.shape) for k, v in rs.state.items()}
                model, data, recipe = _model_and_data(run, setup, cache, shapes, progress)
            if progress:
                progress(f"{run.name}: round {rs.index}: loaded; measuring its test error")
            masks = archive.load_into(model, rs, setup.device)
            error, loss = lmc.evaluate(model, data)
            recorded = recipe.recorded_accuracy(rs.metrics)
            if recorded is None and progress and rs.index == run.rounds[0].index:
                progress(f"{run.name}: round {rs.index} records no test accuracy "
                         f"({recipe.accuracy_key or 'none known for this archive'}): the model, data and "
                         "preprocessing cannot be checked against it; measured errors are used as they come")
            check_accuracy(run, rs.index, recorded, 1.0 - error, recipe, setup.accuracy_tolerance, progress)
            if rs.index == 0:
                dense_error = error
            if rs.index in wanted:
                yield LoadedRound(run, model, data, rs.index, masks, recipe, error, loss,
                                  previous.get(rs.index), dense_error)


def dense_errors(path: Path, setup: Setup, progress=None) -> dict[str, float]:
    """Each selected run's dense error, as lmc takes it: round 0's test error measured as stored
    (NaN, named, without a round 0)."""
    only_zero = Setup(**{**setup.__dict__, "rounds": RoundSpec(((0, 0),), "0")})
    found = {run.name: math.nan for run in runs_below(path, setup)}
    found.update({r.run.name: r.dense_error for r in _loaded_rounds(path, only_zero, progress)})
    return found


PATHS = ("linear", "projected")


def lmc_tables(path: Path, setup: Setup = Setup(), points: int = 11, tolerance: float = 0.01,
               bn_batches: int = 20, progress: Callable[[str], None] | None = None, path_kind: str = "linear",
               warn: Callable[[str], None] | None = None):
    """(lmc, lmc_summary) frames: error along each n -> n+1 segment, its barrier and instability,
    and whether round n+1 is matching: its test error as stored (`next_error`) within `tolerance`
    of its run's dense error, round 0's (flowscan/matching.py)."""
    if path_kind not in PATHS:
        raise FlowscanError(f"unknown path {path_kind!r}; known: {', '.join(PATHS)}")
    curves, summary = [], []
    alphas = lmc.alpha_grid(points)
    previous = None   # the round before: (run, index, state, (error, loss) as stored)
    for r in _loaded_rounds(path, setup, progress):
        run, model, index = r.run, r.model, r.index
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if previous is not None and previous[0] is run and r.previous == previous[1]:
            span = index - previous[1]
            if progress:
                progress(f"{run.name}: rounds {previous[1]}->{index}: {len(alphas)} points on the "
                         f"{path_kind} path" + (f" (across {span - 1} missing round(s): the pair spans {span} rounds)"
                                                if span > 1 else ""))
            curve = lmc.interpolate(model, previous[2], state, r.masks, r.data, alphas, bn_batches,
                                    projected=path_kind == "projected", ends=(previous[3], (r.error, r.loss)),
                                    progress=(lambda text, p=f"{run.name}: rounds {previous[1]}->{index}: ":
                                              progress(p + text)) if progress else None)
            curves += [(run.name, previous[1], float(a), float(e), float(lo), index)
                       for a, e, lo in zip(curve.alphas, curve.errors, curve.losses)]
            start, end = float(curve.errors[0]), float(curve.errors[-1])
            differ = abs(start - previous[3][0]) > tolerance or abs(end - r.error) > tolerance
            if differ and warn:
                warn(f"{run.name}: rounds {previous[1]}->{index}: the path's ends (BatchNorm "
                         f"re-estimated) err {start:.4f} and {end:.4f}, the networks as stored "
                         f"{previous[3][0]:.4f} and {r.error:.4f}: more than the tolerance {tolerance:g} apart; "
                         "the barrier is measured against the path's ends (docs/definitions.md)")
            summary.append((run.name, previous[1], index, span, _density(r.masks), path_kind, curve.barrier,
                            curve.loss_barrier, start, end, previous[3][0], r.error, differ,
                            r.dense_error, tolerance, is_matching(r.error, r.dense_error, tolerance),
                            curve.instability, curve.loss_instability, r.recipe.describe()))
        previous = (run, index, state, (r.error, r.loss))
    return (pl.DataFrame(curves, schema=LMC_SCHEMA, orient="row"),
            pl.DataFrame(summary, schema=SUMMARY_SCHEMA, orient="row"))


def sharpness_table(path: Path, setup: Setup = Setup(), subset: int = 512, tol: float = 1e-3,
                    max_iter: int = 100, progress: Callable[[str], None] | None = None) -> pl.DataFrame:
    rows = []
    for r in _loaded_rounds(path, setup, progress):
        if progress:
            progress(f"{r.run.name}: round {r.index}: Hessian power iteration (at most {max_iter} steps)")
        top = hessian.top_eigenvalue(r.model, r.data, r.masks, subset, tol, max_iter)
        # the Hessian re-estimates BatchNorm first: the error is that network's (else the stored one's)
        error = lmc.evaluate(r.model, r.data)[0] if lmc.has_batchnorm(r.model) else r.error
        rows.append((r.run.name, r.index, _density(r.masks), top.value, top.iterations, top.converged, error,
                     r.recipe.describe()))
        if progress:
            progress(f"{r.run.name}: round {r.index}: lambda_max {top.value:.4g} ({top.iterations} iterations)")
    return pl.DataFrame(rows, schema=SHARPNESS_SCHEMA, orient="row")


PROBE_SCHEMA = {"run": pl.String, "round": pl.Int64, "fraction": pl.Float64, "error": pl.Float64,
                "matching": pl.Boolean, "dense_error": pl.Float64}


def probe_runs(path: Path, setup: Setup = Setup()) -> list[Run]:
    """The runs `probe_fractions` would retrain: `flowscan produce` runs, and open_lth runs (their
    hparams.log says how they were trained)."""
    from flowscan import layout

    runs = runs_below(path, setup)
    foreign = [r.name for r in runs if not (r.path / layout.RUN_MANIFEST).is_file() and r.format != "open_lth"]
    if foreign:
        raise FlowscanError(f"--probe retrains rounds as the run was trained, which flowscan knows for runs made "
                            f"by `flowscan produce` and open_lth runs (hparams.log); not such a run: "
                            f"{', '.join(foreign)} (Chen et al.'s checkpoints do not record their training "
                            "schedule)")
    return runs


def probe_fractions(path: Path, fractions: Sequence[float], tolerance: float = 0.01, setup: Setup = Setup(),
                    progress: Callable[[str], None] | None = None) -> pl.DataFrame:
    """For each selected round of every selected run below `path`, whether each of `fractions`,
    pruned from that round and retrained from the rewind point, still gives a matching network
    (Paul et al.'s limit); matching: within `tolerance` of the run's dense error, taken as lmc takes
    it (round 0's test error measured as stored; unknown, and named, without a round 0). Runs are
    named as `analyze` names them, so the table joins the others."""
    from flowscan import layout
    from flowscan.produce.imp import probe_round

    rows = []
    dense = dense_errors(path, setup, progress)
    for run in probe_runs(path, setup):
        wanted = {r.index for r in run.rounds if r.index in setup.rounds}
        if (run.path / layout.RUN_MANIFEST).is_file():
            found = probe_round(run, sorted(fractions), tolerance, torch.device(setup.device), dense[run.name],
                                wanted, progress)
        else:
            found = _probe_open_lth(run, sorted(fractions), tolerance, setup, dense[run.name], wanted, progress)
        rows += found
        if progress:
            for index in sorted({r[1] for r in found}):
                ok = [f for (_run, i, f, _e, matching, _d) in found if i == index and matching]
                progress(f"{run.name}: round {index}: largest matching fraction "
                         f"{max(ok) if ok else 'none'} of {', '.join(map(str, sorted(fractions)))}")
    return pl.DataFrame(rows, schema=PROBE_SCHEMA, orient="row")


def _probe_open_lth(run: Run, fractions, tolerance: float, setup: Setup, dense_error: float, wanted,
                    progress) -> list[tuple]:
    """`probe_rounds` for an open_lth run: its recipe's data, hparams.log's training settings, the
    rewind weights of level 0, each level's masked end weights (those in `wanted`)."""
    from flowscan.produce.imp import IMPConfig, Session, numpy_state, probe_rounds
    from flowscan.produce.sources import read_round
    from flowscan.readers.base import Round

    states = archive.iter_rounds(run, setup.names)
    first = next(states, None)
    if first is None:
        return []
    recipe, _notes = recipes.recipe_for(run, setup.model, setup.data, {k: tuple(v.shape) for k, v in first.state.items()})
    device = torch.device(setup.device)
    data = load(recipe.data, recipe.norm).to(device)
    args, rewind_file, notes = recipes.open_lth_retraining(run, recipe, len(data.y_train))
    for note in notes:
        if progress:
            progress(f"{run.name}: {note}")
    session = Session(IMPConfig(**args), 0, data, device, compile=False)
    rewind_weights = read_round(Round(0, run.format, (rewind_file,)), setup.names, copy_weights=True).weights
    rewind = {**numpy_state(session.model), **rewind_weights}   # the model's buffers where the file lacks them

    def stored():
        for rs in [first, *states]:
            if rs.index not in wanted:
                continue
            weights = {k: v.numpy() for k, v in rs.state.items()}
            masks = {k: rs.masks.get(k, torch.ones_like(rs.state[k], dtype=torch.bool)) for k in session.names}
            yield rs.index, weights, masks
    return probe_rounds(run.name, session, rewind, stored(), fractions, dense_error, tolerance, progress)
