"""The five output tables of the output contract (README, Output tables): tidy polars frames, written as zstd parquet.

Column names and types are a public interface. All tables are written to temporary files first
and then renamed into place one after another, so a second analysis replaces the set whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import polars as pl

from flowscan import __version__
from flowscan.errors import printable
from flowscan.io.location import location
from flowscan.io.atomic import atomic_path, write_text
from flowscan.pipeline import RunResult

TABLES = ("runs", "rounds", "steps", "eigen", "metrics", "survival")
CORE_TABLES = TABLES[:5]  # what every flowscan version writes; survival came later

SCHEMAS: dict[str, dict[str, pl.DataType]] = {
    "runs": {"run": pl.String, "path": pl.String, "format": pl.String, "n_rounds": pl.Int64,
             "n_prunable_tensors": pl.Int64, "n_prunable_params": pl.Int64, "status": pl.String,
             "error": pl.String, "blocks": pl.String, "mask_source": pl.String, "notes": pl.String,
             # the completeness of the run in its layout: rounds analysed, rounds absent inside the
             # run, rounds after the last complete one that are still being written
             "complete_rounds": pl.List(pl.Int64), "missing_rounds": pl.List(pl.Int64),
             "incomplete_rounds": pl.List(pl.Int64), "never_pruned": pl.List(pl.String)},
    "rounds": {"run": pl.String, "round": pl.Int64, "block": pl.String, "n_params": pl.Int64,
               "n_unpruned": pl.Int64, "abs_sum": pl.Float64, "M": pl.Float64, "P": pl.Float64,
               "density": pl.Float64, "global_density": pl.Float64},
    "steps": {"run": pl.String, "block": pl.String, "quantity": pl.String, "round": pl.Int64,
              "lambda": pl.Float64, "c": pl.Float64, "x": pl.Float64, "sigma": pl.Float64,
              "valid": pl.Boolean, "span": pl.Int64},
    "eigen": {"run": pl.String, "block": pl.String, "quantity": pl.String, "n_pairs": pl.Int64,
              "lambda_mean": pl.Float64, "lambda_sem": pl.Float64, "sigma_mean": pl.Float64,
              "sigma_sem": pl.Float64, "sigma_fit": pl.Float64, "sigma_fit_se": pl.Float64,
              "r2": pl.Float64, "eigen_ok": pl.Boolean, "sigma_trend": pl.Float64, "sigma_trend_p": pl.Float64,
              "exponential_ok": pl.Boolean, "relevance": pl.String, "never_pruned_share": pl.Float64},
    "metrics": {"run": pl.String, "round": pl.Int64, "name": pl.String, "value": pl.Float64},
    # of the weights kept in round n, the share still kept in round n+1 (and those revived there)
    "survival": {"run": pl.String, "block": pl.String, "round": pl.Int64, "n_survivors": pl.Int64,
                 "n_still_surviving": pl.Int64, "n_revived": pl.Int64, "survival": pl.Float64,
                 "span": pl.Int64},
}


def _frame(name: str, columns: Mapping[str, Sequence]) -> pl.DataFrame:
    return pl.DataFrame({k: list(columns.get(k, [])) for k in SCHEMAS[name]}, schema=SCHEMAS[name])


def build_tables(results: Sequence[RunResult]) -> dict[str, pl.DataFrame]:
    """The tables of every run; a run whose rows cannot be built becomes an error row of its own."""
    cols: dict[str, dict[str, list]] = {t: {k: [] for k in SCHEMAS[t]} for t in TABLES}
    for res in results:
        try:
            columns = _run_columns(res)
        except Exception as exc:  # noqa: BLE001 - one run's failure costs only that run
            # the run becomes an error for every later reader of `results` too (summary, exit code)
            res.error = printable(f"{res.run.path}: building its tables failed: {type(exc).__name__}: {exc}")
            res.flow = None
            columns = _run_columns(res)
        for table, table_columns in columns.items():
            for key, values in cols[table].items():
                values.extend(table_columns[key])
    return {t: _frame(t, cols[t]) for t in TABLES}


def _grid(values, rows: int, cols: int) -> list:
    """A rows x cols array (or a per-row / per-column vector, broadcast) as a flat list, row-major."""
    return np.broadcast_to(np.asarray(values), (rows, cols)).ravel().tolist()


def _run_columns(res: RunResult) -> dict[str, dict[str, list]]:
    """Columns of every table for one run (numpy grids flattened row-major: round/step, then block)."""
    out: dict[str, dict[str, list]] = {t: {k: [] for k in SCHEMAS[t]} for t in TABLES}
    run, f = res.run, res.flow
    ok = res.ok and f is not None
    runs = dict(run=run.name, path=printable(str(run.path)), format=run.format, n_rounds=len(run.rounds),
                n_prunable_tensors=len(res.tensors) if ok else 0, n_prunable_params=res.n_prunable_params if ok else 0,
                status="ok" if ok else "error", error=printable(res.error) if res.error else None,
                blocks=res.blocks_rule or None, mask_source=res.mask_source or None,
                notes=printable("; ".join(run.notes)) or None, complete_rounds=run.complete_rounds,
                missing_rounds=run.missing_rounds, incomplete_rounds=run.unfinished_rounds,
                never_pruned=list(res.never_pruned))
    out["runs"] = {k: [v] for k, v in runs.items()}
    if not ok:
        return out
    never = set(res.never_pruned)
    n_never = {b: 0 for b in res.blocks}
    for name, label, size in zip(res.tensors, res.labels, res.sizes):
        if name in never:
            n_never[label] += size
    n_rounds, n_blocks, n_steps = len(f.rounds), len(res.blocks), len(f.step_rounds)
    rounds_idx = np.asarray(f.rounds, dtype=np.int64)[:, None]
    steps_idx = np.asarray(f.step_rounds, dtype=np.int64)[:, None]
    blocks = np.asarray(res.blocks, dtype=object)[None, :]
    out["rounds"] = dict(
        run=[run.name] * (n_rounds * n_blocks), round=_grid(rounds_idx, n_rounds, n_blocks),
        block=_grid(blocks, n_rounds, n_blocks), n_params=_grid(np.asarray(f.n_params, np.int64), n_rounds, n_blocks),
        n_unpruned=_grid(np.asarray(f.n_unpruned, np.int64), n_rounds, n_blocks),
        abs_sum=_grid(np.asarray(f.abs_sum, np.float64), n_rounds, n_blocks),
        M=_grid(np.asarray(f.M, np.float64), n_rounds, n_blocks), P=_grid(np.asarray(f.P, np.float64), n_rounds, n_blocks),
        density=_grid(np.asarray(f.block_density, np.float64), n_rounds, n_blocks),
        global_density=_grid(np.asarray(f.density, np.float64)[:, None], n_rounds, n_blocks))
    steps = {k: [] for k in SCHEMAS["steps"]}
    eigen = {k: [] for k in SCHEMAS["eigen"]}
    for quantity, (lam, sigma, valid) in f.steps.items():
        # steps are listed block by block, each over its steps: the transposed grid
        size = n_steps * n_blocks
        steps["run"] += [run.name] * size
        steps["block"] += _grid(np.asarray(res.blocks, dtype=object)[:, None], n_blocks, n_steps)
        steps["quantity"] += [quantity] * size
        steps["round"] += _grid(steps_idx.T, n_blocks, n_steps)
        steps["lambda"] += np.asarray(lam, np.float64).T.ravel().tolist()
        steps["c"] += _grid(np.asarray(f.c, np.float64)[None, :], n_blocks, n_steps)
        steps["x"] += _grid(np.asarray(f.x, np.float64)[None, :], n_blocks, n_steps)
        steps["sigma"] += np.asarray(sigma, np.float64).T.ravel().tolist()
        steps["valid"] += np.asarray(valid, bool).T.ravel().tolist()
        steps["span"] += _grid(np.asarray(f.step_span, np.int64)[None, :], n_blocks, n_steps)
        e = res.eigen[quantity]
        eigen_ok, trend_p, exponential, verdicts = e.eigen_ok, e.trend_p, e.exponential_ok, e.relevance
        for b, block in enumerate(res.blocks):
            fit = e.fits[b]
            for key, value in dict(
                    run=run.name, block=block, quantity=quantity, n_pairs=int(e.n_pairs[b]),
                    lambda_mean=float(e.lambda_mean[b]), lambda_sem=float(e.lambda_sem[b]),
                    sigma_mean=float(e.sigma_mean[b]), sigma_sem=float(e.sigma_sem[b]),
                    sigma_fit=float(fit.slope), sigma_fit_se=float(fit.slope_se), r2=float(fit.r2),
                    eigen_ok=bool(eigen_ok[b]), sigma_trend=float(e.trends[b].slope),
                    sigma_trend_p=float(trend_p[b]), exponential_ok=bool(exponential[b]),
                    relevance=verdicts[b],
                    never_pruned_share=n_never[block] / float(f.n_params[b]) if f.n_params[b] else 0.0).items():
                eigen[key].append(value)
    out["steps"], out["eigen"] = steps, eigen
    out["metrics"] = dict(run=[run.name] * len(res.metrics), round=[m[0] for m in res.metrics],
                          name=[m[1] for m in res.metrics], value=[m[2] for m in res.metrics])
    counts = (np.zeros((n_steps, n_blocks, 3), np.int64) if res.survival is None or not n_steps
              else np.asarray(res.survival, dtype=np.int64).reshape(n_steps, n_blocks, 3))
    before, both, after = counts[..., 0], counts[..., 1], counts[..., 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(before > 0, both / np.maximum(before, 1), np.nan)
    out["survival"] = dict(
        run=[run.name] * (n_steps * n_blocks), block=_grid(blocks, n_steps, n_blocks),
        round=_grid(steps_idx, n_steps, n_blocks), n_survivors=before.ravel().tolist(),
        n_still_surviving=both.ravel().tolist(), n_revived=(after - both).ravel().tolist(),
        survival=share.ravel().tolist(), span=_grid(np.asarray(f.step_span, np.int64)[:, None], n_steps, n_blocks))
    return out


def metadata(command: str, blocks: str, *, analysis_id: str = "", source: str = "") -> dict[str, str]:
    """Key-value metadata of a table: version, command, block rules, and its identity: the
    analysis it derives from (`analysis_id`) and, for tables computed from an archive (lmc,
    sharpness), that archive's path (`source`)."""
    return {"flowscan_version": __version__, "command": command, "blocks": blocks,
            "analysis_id": analysis_id, "source": source}


# -- one output folder describes one analysis ---------------------------------------------------
ANALYSIS_MANIFEST = "flowscan-analysis.json"
# tables computed from the scan tables (statistics) or from the archive (landscape), by later
# commands: the one list that setting stale tables aside, `report` and `plot` share
STATS_TABLES = ("experiments", "experiment_runs", "scaling", "compare", "compare_tree")
LANDSCAPE_TABLES = ("lmc", "lmc_summary", "sharpness", "fraction_probe")
DERIVED_TABLES = STATS_TABLES + LANDSCAPE_TABLES
DERIVED_FILES = ("figures", "report.html")


def analysis_identity(path: Path, options: Mapping[str, str]) -> dict[str, str]:
    """What makes two analyses the same: the archive's path and the scan options."""
    source = str(location(path).resolve())
    digest = hashlib.sha256(json.dumps([source, dict(options)], sort_keys=True).encode()).hexdigest()[:16]
    return {"analysis_id": digest, "source": source, "options": dict(options)}


def read_manifest(out: Path) -> dict | None:
    try:
        data = json.loads((Path(out) / ANALYSIS_MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "analysis_id" in data else None


def write_manifest(out: Path, identity: Mapping[str, object]) -> None:
    write_text(Path(out) / ANALYSIS_MANIFEST, json.dumps(
        {**identity, "flowscan_version": __version__, "tables": list(TABLES)}, indent=2, sort_keys=True))


def current_id(out: Path) -> str:
    """The analysis id of the scan tables in `out` ("" when there are none yet)."""
    manifest = read_manifest(out)
    return manifest["analysis_id"] if manifest else ""


def is_stale(table: Path, manifest: Mapping | None) -> bool:
    """A derived table that belongs to another analysis than the folder's scan tables."""
    if manifest is None:
        return False
    meta = read_metadata(table)
    if meta.get("source"):   # computed from an archive: stale if it was another archive
        return meta["source"] != manifest.get("source")
    return meta.get("analysis_id", "") != manifest["analysis_id"]


def set_aside_stale(out: Path, identity: Mapping[str, str]) -> tuple[Path | None, list[str]]:
    """Before new scan tables are written: move the derived outputs of another analysis into
    `OUT/stale-<their id>/`, so no table of one archive is shown with the runs of another."""
    out = Path(out)
    old = read_manifest(out)
    candidates = [out / f"{t}.parquet" for t in DERIVED_TABLES] + [out / f for f in DERIVED_FILES]
    present = [p for p in candidates if p.exists()]
    if not present:
        return None, []
    if old is not None and old["analysis_id"] == identity["analysis_id"]:
        moving = [p for p in present if p.suffix == ".parquet" and is_stale(p, old)]
    else:
        new = {"analysis_id": identity["analysis_id"], "source": identity["source"]}
        moving = [p for p in present if p.suffix != ".parquet" or is_stale(p, new)]
    if not moving:
        return None, []
    aside = out / f"stale-{old['analysis_id'] if old else 'unknown'}"
    aside.mkdir(exist_ok=True)
    for p in moving:
        target = aside / p.name
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.replace(p, target)
    return aside, [p.name for p in moving]


def read_derived(out: Path, name: str, warnings: list[str] | None = None) -> pl.DataFrame | None:
    """A derived table of `out`, or None when absent or stale (then a warning says why)."""
    path = Path(out) / f"{name}.parquet"
    if not path.is_file():
        return None
    if is_stale(path, read_manifest(out)):
        if warnings is not None:
            warnings.append(f"{path}: from another analysis than the tables in {out} (ignored; "
                            f"re-run the command that wrote it)")
        return None
    return pl.read_parquet(path)


def write_tables(frames: Mapping[str, pl.DataFrame], out: Path, meta: Mapping[str, str]) -> list[Path]:
    """Write every table to a temporary file, then rename them all into place."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # On any failure every temporary file is removed; on success all are renamed at the end.
    with contextlib.ExitStack() as stack:
        for name, frame in frames.items():
            tmp = stack.enter_context(atomic_path(out / f"{name}.parquet"))
            # polars' own writer: importing pyarrow to write would cost a fifth of the CLI's start-up
            frame.write_parquet(tmp, compression="zstd", metadata={f"flowscan.{k}": v for k, v in meta.items()})
    return [out / f"{name}.parquet" for name in frames]


def read_tables(out: Path, names: Sequence[str] = CORE_TABLES,
                optional: Sequence[str] = ()) -> dict[str, pl.DataFrame]:
    """The tables of an earlier `analyze`; `optional` ones are included when present."""
    out = Path(out)
    missing = [n for n in names if not (out / f"{n}.parquet").is_file()]
    if missing:
        from flowscan.errors import FlowscanError
        raise FlowscanError(f"{out}: missing {', '.join(m + '.parquet' for m in missing)} "
                            "(run `flowscan analyze PATH -o OUT` first)")
    wanted = list(names) + [n for n in optional if (out / f"{n}.parquet").is_file()]
    return {n: pl.read_parquet(out / f"{n}.parquet") for n in wanted}


def write_table(frame: pl.DataFrame, path: Path, meta: Mapping[str, str]) -> Path:
    return write_tables({Path(path).stem: frame}, Path(path).parent, meta)[0]


def read_metadata(path: Path) -> dict[str, str]:
    """The flowscan.* key-value metadata of a table's file."""
    raw = pl.read_parquet_metadata(path)
    return {k[len("flowscan."):]: v for k, v in raw.items() if k.startswith("flowscan.")}
