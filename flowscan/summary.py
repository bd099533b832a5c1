"""Plain-text views for the terminal: the analysis summary and the inspection listing."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from flowscan.errors import printable
from flowscan.pipeline import Inspection, RunResult


def _pm(mean: float, sem: float) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:+.4f} ± {sem:.4f}" if math.isfinite(sem) else f"{mean:+.4f}"


def analysis_summary(results: Sequence[RunResult]) -> str:
    lines = []
    for res in results:
        run = res.run
        if not res.ok:
            lines.append(f"run {run.name}  [{run.format}]  FAILED: {res.error}")
            continue
        f = res.flow
        lines.append(f"run {run.name}  [{run.format}, {len(f.rounds)} rounds, density "
                     f"{f.density[0]:.3f} -> {f.density[-1]:.3f}, blocks: {res.blocks_rule}]")
        if run.missing_rounds or run.unfinished_rounds:
            lines.append(f"  rounds: {completeness_text(run)}")
        e = res.eigen["M"]
        width = max([len(b) for b in res.blocks] + [5])
        never = _never_pruned_blocks(res)
        lines.append(f"  {'block':<{width}}  {'lambda (M), mean ± SEM':>22}  {'sigma (M), mean ± SEM':>22}  "
                     f"{'sigma_fit':>9}  pairs  eigen  exp  class")
        eigen_ok, exponential_ok, verdicts = e.eigen_ok, e.exponential_ok, e.relevance
        for b, block in enumerate(res.blocks):
            lines.append(f"  {block:<{width}}  {_pm(e.lambda_mean[b], e.lambda_sem[b]):>22}  "
                         f"{_pm(e.sigma_mean[b], e.sigma_sem[b]):>22}  "
                         f"{e.fits[b].slope:>+9.4f}  {int(e.n_pairs[b]):>5}  "
                         f"{'yes' if eigen_ok[b] else 'no':>5}  {'yes' if exponential_ok[b] else 'no':>3}  "
                         f"{verdicts[b]}"
                         + ("  (holds never-pruned tensors)" if block in never and verdicts[b] != "never_pruned"
                            else ""))
        classes = {}
        for b, block in enumerate(res.blocks):
            classes.setdefault(verdicts[b], []).append(block)
        lines.append("  " + "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(classes.items())))
    failed = sum(not r.ok for r in results)
    if failed < len(results):
        lines.append("eigen: the SEM of lambda is under 5 % of its mean (the paper's test); exp: the share is one "
                     "exponential in the coarse-graining scale, without material drift (docs/definitions.md).")
    lines.append(f"{len(results)} run(s) analysed, {failed} failed.")
    return "\n".join(lines)


def _never_pruned_blocks(res: RunResult) -> set[str]:
    """Blocks holding a tensor that is never pruned (its share grows only as the others shrink)."""
    never = set(res.never_pruned)
    return {label for name, label in zip(res.tensors, res.labels) if name in never}


def completeness_text(run) -> str:
    """`complete 0-3, 5; missing 4; being written 6` for a run's rounds."""
    parts = [f"complete {_rounds_text(run.complete_rounds)}"]
    if run.missing_rounds:
        parts.append(f"missing {_rounds_text(run.missing_rounds)}")
    if run.unfinished_rounds:
        parts.append(f"being written {_rounds_text(run.unfinished_rounds)}")
    return "; ".join(parts)


def completeness_data(run) -> dict:
    return {"complete_rounds": run.complete_rounds, "missing_rounds": run.missing_rounds,
            "incomplete_rounds": run.unfinished_rounds, "incomplete": {str(k): v for k, v in run.incomplete.items()}}


def inspection_data(items: Sequence[Inspection]) -> list[dict]:
    """`inspection_text` as data (for --json)."""
    out = []
    for item in items:
        run = item.run
        entry = {"run": run.name, "path": str(run.path), "format": run.format, "notes": list(run.notes),
                 "error": item.error, "rounds": [{"round": r.index, "files": [str(f) for f in r.files],
                                                   "metrics": dict(r.metrics)} for r in run.rounds],
                 **completeness_data(run)}
        if not item.error:
            entry.update(mask_source=item.mask_source, blocks_rule=item.blocks_rule, prunable=[
                {"tensor": n, "shape": list(item.tensors[n].shape), "block": label}
                for n, label in zip(item.prunable, item.labels)])
        out.append(entry)
    return out


def analysis_data(results: Sequence[RunResult]) -> list[dict]:
    """`analysis_summary` as data (for --json): per run its status and sigma (M) per block."""
    out = []
    for res in results:
        item = {"run": res.run.name, "format": res.run.format, "status": "ok" if res.ok else "error",
                "error": res.error, "notes": list(res.run.notes), "warnings": list(res.warnings),
                "never_pruned": list(res.never_pruned), **completeness_data(res.run)}
        if res.ok:
            e = res.eigen["M"]
            item.update(rounds=[int(r) for r in res.flow.rounds], blocks_rule=res.blocks_rule, blocks=[
                {"block": block, "sigma_mean": float(e.sigma_mean[b]), "sigma_sem": float(e.sigma_sem[b]),
                 "sigma_fit": float(e.fits[b].slope), "n_pairs": int(e.n_pairs[b]),
                 "relevance": e.relevance[b]} for b, block in enumerate(res.blocks)])
        out.append(item)
    return out


def _rounds_text(indices: Sequence[int]) -> str:
    if not indices:
        return "none"
    if list(indices) == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}-{indices[-1]}" if len(indices) > 1 else str(indices[0])
    return ", ".join(map(str, indices))


def inspection_text(items: Sequence[Inspection]) -> str:
    lines = []
    for item in items:
        run = item.run
        lines.append(f"run {run.name}  [format {run.format}]  {printable(str(run.path))}")
        for note in run.notes:
            lines.append(f"  note: {note}")
        if item.error:
            lines.append(f"  ERROR: {item.error}")
            continue
        lines.append(f"  rounds: {completeness_text(run)}")
        for rnd in run.rounds:
            metrics = " ".join(f"{k}={v:.4g}" for k, v in rnd.metrics.items())
            files = ", ".join(printable(str(p)) for p in rnd.files)
            lines.append(f"    {rnd.index:>3}  {files}" + (f"  [{metrics}]" if metrics else ""))
        for index, why in sorted(run.incomplete.items()):
            state = "being written" if index in run.unfinished_rounds else "missing"
            lines.append(f"    {index:>3}  ({state}) {why}")
        n_params = sum(int(np.prod(item.tensors[n].shape)) for n in item.prunable)
        lines.append(f"  masks: {item.mask_source}; blocks: {item.blocks_rule}")
        lines.append(f"  prunable tensors: {len(item.prunable)} ({n_params:,} parameters)")
        width = max(len(n) for n in item.prunable)
        for name, label in zip(item.prunable, item.labels):
            lines.append(f"    {name:<{width}}  {str(item.tensors[name].shape):<20}  -> {label}")
        rest = [n for n in item.tensors if n not in set(item.prunable)]
        lines.append(f"  not prunable (no mask): {len(rest)} tensor(s)"
                     + (f", e.g. {', '.join(rest[:4])}" if rest else ""))
        if item.unmatched:
            lines.append(f"  matched no block rule (-> (other)): {', '.join(item.unmatched)}")
    return "\n".join(lines)


def sigma_grid(sigmas, sem: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header ("σ(block)" per block, in model order) and one row of cells per unit.

    `sigmas` has unit, block, sigma, sigma_sem columns."""
    units = list(dict.fromkeys(sigmas["unit"].to_list()))
    blocks = list(dict.fromkeys(sigmas["block"].to_list()))
    verdicts = sigmas["relevance"] if "relevance" in sigmas.columns else [None] * sigmas.height
    cell = {(u, b): (s, e, v) for (u, b, s, e), v in
            zip(sigmas.select("unit", "block", "sigma", "sigma_sem").iter_rows(), verdicts)}

    def fmt(u, b):
        s, e, verdict = cell.get((u, b), (None, None, None))
        if verdict == "never_pruned":
            return "never pruned"
        if s is None or not math.isfinite(s):
            return "—"
        return f"{s:.3f} ± {e:.3f}" if sem and e is not None and math.isfinite(e) else f"{s:.3f}"

    return [f"σ({b})" for b in blocks], [[u] + [fmt(u, b) for b in blocks] for u in units]


def paper_table(sigmas, style: str = "paper", sem: bool = False, unit: str = "run") -> str:
    """Rows: units (runs or experiments); columns: sigma per block (model order), as in Redman
    et al.'s Tables 2-6."""
    columns, rows = sigma_grid(sigmas, sem)
    header = [unit.upper() if style == "paper" else unit] + columns
    if style == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in [header] + rows)


def experiments_text(experiments, quantity: str = "M") -> str:
    """One row per experiment and block: sigma ± the SEM its verdict uses (the larger of the pooled and
    the between-seed SEM, both shown), lambda per round ± SEM, runs, steps and the verdict."""
    frame = experiments.filter(experiments["quantity"] == quantity)
    rows = [(str(r["experiment"]), str(r["block"]), f"{r['n_runs']}", f"{r['n_steps']}",
             _pm(r["sigma_mean"], r["sigma_sem"]), _num(r["sigma_pooled_sem"]), _num(r["sigma_between_sem"]),
             _pm(r["lambda_mean"], r["lambda_sem"]), r["relevance"]) for r in frame.iter_rows(named=True)]
    header = ("experiment", "block", "runs", "steps", f"sigma ({quantity}) ± SEM", "pooled SEM", "between SEM",
              f"lambda ({quantity}) ± SEM", "class")
    widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i in (0, 1, 8) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    lines.append("SEM: the larger of the pooled SEM (every step of every seed) and the between-seed SEM (of the "
                 "seeds' means), so seeds that disagree widen it; lambda per round (docs/definitions.md).")
    return "\n".join(line.rstrip() for line in lines)


def _num(value) -> str:
    return f"{value:.4f}" if value is not None and math.isfinite(value) else "n/a"


def scaling_text(scaling) -> str:
    """One row per fit, whatever its status: gamma ± SE, the bootstrap interval, eps_np, eps_dagger with
    its bound (the chance error, or `held` at --eps-dagger), p, the points and the fit's own reason.
    Only the statuses of MEASURED are measurements of gamma; the status stands beside every number."""
    from flowscan.stats.critical import MEASURED

    names = [str(r["name"]) for r in scaling.iter_rows(named=True)]
    width = max([len("name"), *map(len, names)])
    status_width = max([len("status"), *(len(s) for s in scaling["status"].to_list())]) if scaling.height else 6
    lines = [f"{'level':<10} {'name':<{width}} {'status':<{status_width}} {'gamma ± SE':>22} {'95% interval':>20} "
             f"{'eps_np':>7} {'eps_dag':>7} {'eps_dag max':>11} {'p':>8} {'points':>6}  reason"]
    for r in scaling.iter_rows(named=True):
        head = f"{r['level']:<10} {str(r['name']):<{width}} {r['status']:<{status_width}}"
        if r["status"] == "error":
            lines.append(f"{head} not fitted: {r['error']}")
            continue
        low, high = r["gamma_ci_low"], r["gamma_ci_high"]
        ci = f"[{low:.3f}, {high:.3f}]" if math.isfinite(low) and math.isfinite(high) else "n/a"
        if r.get("epsilon_dagger_fixed"):
            bound = "held"
        else:
            top = r.get("epsilon_dagger_max")
            bound = f"{top:.4f}" if top is not None and math.isfinite(top) else "none"
        reason = r["error"] or ("a measurement" if r["status"] in MEASURED else "")
        lines.append(f"{head} {_pm(r['gamma'], r['gamma_se']):>22} {ci:>20} {r['epsilon_np']:>7.4f} "
                     f"{r['epsilon_dagger']:>7.4f} {bound:>11} {r['p']:>8.4f} {r['n_points']:>6}  {reason}")
    if scaling.height and not set(MEASURED) & set(scaling["status"]):
        lines.append("No fit measures gamma: the error probably never follows Eq. 15's power law over the densities "
                     "reached (it stays near the dense error, or the sparsest rounds are missing): prune further.")
    return "\n".join(lines)


def compare_text(pairs, classes: dict) -> str:
    lines = ["classes:"]
    by_class: dict[int, list[str]] = {}
    for unit, c in classes.items():
        by_class.setdefault(c, []).append(unit)
    for c, units in sorted(by_class.items()):
        lines.append(f"  {c}: {', '.join(units)}")
    if not pairs.height:
        lines.append("pairs: none (one unit alone: nothing to compare)")
        return "\n".join(lines)
    lines.append("pairs (RMS sigma distance over shared blocks; relevance agreement):")
    unshared = pairs.filter(pairs["n_shared_blocks"] == 0)   # Series masks: no polars import here
    for r in pairs.filter(pairs["n_shared_blocks"] > 0).sort("rms", nulls_last=True).iter_rows(named=True):
        agree = "agree" if r["relevance_agree"] else f"conflict in {r['conflict_blocks']}"
        rms = f"{r['rms']:.4f}" if r["rms"] is not None and math.isfinite(r["rms"]) else "n/a"
        lines.append(f"  {r['a']}  ~  {r['b']}: rms {rms} over {r['n_shared_blocks']} blocks, {agree}")
    if unshared.height:  # one line, not one per pair: with many units these are most pairs
        units = sorted(set(unshared["a"].to_list()) | set(unshared["b"].to_list()))
        lines.append(f"  {unshared.height} pair(s) share no block and are not compared (among "
                     f"{', '.join(units[:8])}{', ...' if len(units) > 8 else ''}); "
                     "use the same --blocks rules for all")
    return "\n".join(lines)


def landscape_text(frames: dict) -> str:
    """The results of `lmc` and `sharpness` for stdout: one line per round (and per probed fraction)."""
    lines = []
    lmc = frames.get("lmc_summary")
    if lmc is not None:
        for r in lmc.iter_rows(named=True):
            verdict = {True: "matching", False: "not matching", None: "matching unknown: no round 0"}[r["matching"]]
            span = f" (spans {r['span']} rounds)" if r.get("span", 1) > 1 else ""
            ends = (f"; path ends {r['error_start']:.4f}, {r['error_end']:.4f} differ from the stored networks' "
                    f"{r['stored_error_start']:.4f}, {r['next_error']:.4f}") if r.get("ends_differ") else ""
            lines.append(f"{r['run']}: rounds {r['round']}->{r['next_round']}{span}: barrier {r['barrier']:+.4f}, "
                         f"round {r['next_round']} error {r['next_error']:.4f} vs dense {r['dense_error']:.4f} "
                         f"({verdict}); instability {r['instability']:+.4f}{ends}")
    sharp = frames.get("sharpness")
    if sharp is not None:
        for r in sharp.iter_rows(named=True):
            lines.append(f"{r['run']}: round {r['round']}: density {r['density']:.4f}, lambda_max "
                         f"{r['lambda_max']:.4g} ({r['iterations']} iterations"
                         f"{'' if r['converged'] else ', not converged'})")
    probe = frames.get("fraction_probe")
    if probe is not None:
        for r in probe.iter_rows(named=True):
            lines.append(f"{r['run']}: round {r['round']}: fraction {r['fraction']:.3f}: error {r['error']:.4f} "
                         f"({'matching' if r['matching'] else 'not matching'})")
    return "\n".join(lines) if lines else "no rounds to evaluate"
