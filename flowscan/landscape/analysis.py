"""Tables of the landscape analyses for every run below a path (named as `analyze` names them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import polars as pl
import torch

from flowscan.errors import FlowscanError
from flowscan.landscape import archive, hessian, lmc
from flowscan.produce.data import Dataset, load
from flowscan.readers.base import NameOptions, Run
from flowscan.readers.discover import discover

LMC_SCHEMA = {"run": pl.String, "round": pl.Int64, "alpha": pl.Float64, "error": pl.Float64, "loss": pl.Float64}
SUMMARY_SCHEMA = {"run": pl.String, "round": pl.Int64, "next_round": pl.Int64, "density": pl.Float64,
                  "path": pl.String, "barrier": pl.Float64, "instability": pl.Float64,
                  "loss_barrier": pl.Float64, "loss_instability": pl.Float64, "error_start": pl.Float64,
                  "error_end": pl.Float64, "dense_error": pl.Float64, "tolerance": pl.Float64,
                  "matching": pl.Boolean}
SHARPNESS_SCHEMA = {"run": pl.String, "round": pl.Int64, "density": pl.Float64, "lambda_max": pl.Float64,
                    "iterations": pl.Int64, "converged": pl.Boolean, "error": pl.Float64}


@dataclass(frozen=True)
class Setup:
    model: str | None = None     # flowscan model name or package.module:function; default from the manifest
    data: str | None = None
    device: str = "cpu"          # a torch device name ("auto" is resolved by the command)
    names: NameOptions = NameOptions()
    format: str | None = None


def runs_below(path: Path, setup: Setup) -> list[Run]:
    runs = [r for r in discover(Path(path), setup.format) if not r.error]
    if not runs:
        raise FlowscanError(f"{path}: no readable IMP runs found")
    return runs


def _model_and_data(run: Run, setup: Setup, cache: dict) -> tuple[torch.nn.Module, Dataset]:
    args = archive.produce_args(run) or {}
    model_spec = setup.model or args.get("model")
    data_spec = setup.data or args.get("data")
    if not model_spec or not data_spec:
        raise FlowscanError(f"{run.path}: not written by `flowscan produce`; name the model and data "
                            "with --model and --data")
    device = torch.device(setup.device)
    if data_spec not in cache:
        cache[data_spec] = load(data_spec).to(device)
    data = cache[data_spec]
    torch.manual_seed(0)
    return archive.build_model(model_spec, data.input_shape, data.n_classes).to(device), data


def _density(masks: dict[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / total if total else float("nan")


def _loaded_rounds(path: Path, setup: Setup) -> Iterator[tuple[Run, torch.nn.Module, Dataset, int, dict]]:
    """(run, model holding the round's masked weights, data, round index, masks), round by round."""
    cache: dict[str, Dataset] = {}
    for run in runs_below(path, setup):
        model, data = _model_and_data(run, setup, cache)
        for rs in archive.iter_rounds(run, setup.names):
            yield run, model, data, rs.index, archive.load_into(model, rs, setup.device)


PATHS = ("linear", "projected")


def lmc_tables(path: Path, setup: Setup = Setup(), points: int = 11, tolerance: float = 0.01,
               bn_batches: int = 20, progress: Callable[[str], None] | None = None, path_kind: str = "linear"):
    """(lmc, lmc_summary) frames: error along each n -> n+1 segment, its barrier and instability.

    Round n+1 is matching when its test error is within `tolerance` of the dense error, the mean
    of round 0's test error over every run below `path` (the experiment's seeds)."""
    if path_kind not in PATHS:
        raise FlowscanError(f"unknown path {path_kind!r}; known: {', '.join(PATHS)}")
    curves, summary, dense = [], [], []
    alphas = lmc.alpha_grid(points)
    previous = None   # (run, round index, state) of the round before
    for run, model, data, index, masks in _loaded_rounds(path, setup):
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if previous is not None and previous[0] is run and index == previous[1] + 1:
            curve = lmc.interpolate(model, previous[2], state, masks, data, alphas, bn_batches,
                                    projected=path_kind == "projected")
            if previous[1] == 0:
                dense.append(float(curve.errors[0]))
            curves += [(run.name, previous[1], float(a), float(e), float(lo))
                       for a, e, lo in zip(curve.alphas, curve.errors, curve.losses)]
            summary.append((run.name, previous[1], index, _density(masks), path_kind, curve.barrier,
                            curve.instability, curve.loss_barrier, curve.loss_instability,
                            float(curve.errors[0]), float(curve.errors[-1])))
            if progress:
                progress(f"{run.name}: rounds {previous[1]}->{index}: barrier {curve.barrier:+.4f}, "
                         f"instability {curve.instability:+.4f}")
        previous = (run, index, state)
    dense_error = float(np.mean(dense)) if dense else float("nan")   # NaN: no round 0 in the archive
    rows = [(*row, dense_error, tolerance, bool(row[-1] <= dense_error + tolerance)) for row in summary]
    return (pl.DataFrame(curves, schema=LMC_SCHEMA, orient="row"),
            pl.DataFrame(rows, schema=SUMMARY_SCHEMA, orient="row"))


def sharpness_table(path: Path, setup: Setup = Setup(), subset: int = 512, tol: float = 1e-3,
                    max_iter: int = 100, progress: Callable[[str], None] | None = None) -> pl.DataFrame:
    rows = []
    for run, model, data, index, masks in _loaded_rounds(path, setup):
        top = hessian.top_eigenvalue(model, data, masks, subset, tol, max_iter)
        error, _loss = lmc.evaluate(model, data)
        rows.append((run.name, index, _density(masks), top.value, top.iterations, top.converged, error))
        if progress:
            progress(f"{run.name}: round {index}: lambda_max {top.value:.4g} ({top.iterations} iterations)")
    return pl.DataFrame(rows, schema=SHARPNESS_SCHEMA, orient="row")


PROBE_SCHEMA = {"run": pl.String, "round": pl.Int64, "fraction": pl.Float64, "error": pl.Float64,
                "matching": pl.Boolean}


def probe_runs(path: Path, setup: Setup = Setup()) -> list[Run]:
    """The runs `probe_fractions` would retrain; each must be a `flowscan produce` run."""
    from flowscan import layout

    runs = runs_below(path, setup)
    foreign = [r.name for r in runs if not (r.path / layout.RUN_MANIFEST).is_file()]
    if foreign:
        raise FlowscanError(f"--probe retrains rounds, which needs runs made by `flowscan produce`; "
                            f"not such a run: {', '.join(foreign)}")
    return runs


def probe_fractions(path: Path, fractions: Sequence[float], tolerance: float = 0.01, setup: Setup = Setup(),
                    progress: Callable[[str], None] | None = None) -> pl.DataFrame:
    """For each round of every `produce` run below `path`, whether each of `fractions`, pruned
    from that round and retrained from the rewind point, still gives a matching network (Paul et
    al.'s limit). Runs are named as `analyze` names them, so the table joins the others."""
    from flowscan.produce.imp import probe_round

    rows = []
    for run in probe_runs(path, setup):
        found = probe_round(run, sorted(fractions), tolerance, torch.device(setup.device))
        rows += found
        if progress:
            for index in sorted({r[1] for r in found}):
                ok = [f for (_run, i, f, _e, matching) in found if i == index and matching]
                progress(f"{run.name}: round {index}: largest matching fraction "
                         f"{max(ok) if ok else 'none'} of {', '.join(map(str, sorted(fractions)))}")
    return pl.DataFrame(rows, schema=PROBE_SCHEMA, orient="row")
