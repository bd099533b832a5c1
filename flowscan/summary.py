"""Plain-text views for the terminal: the analysis summary and the inspection listing."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from flowscan.flow import relevance
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
        e = res.eigen["M"]
        width = max([len(b) for b in res.blocks] + [5])
        lines.append(f"  {'block':<{width}}  {'sigma (M), mean ± SEM':>22}  {'sigma_fit':>9}  pairs  class")
        for b, block in enumerate(res.blocks):
            lines.append(f"  {block:<{width}}  {_pm(e.sigma_mean[b], e.sigma_sem[b]):>22}  "
                         f"{e.fits[b].slope:>+9.4f}  {int(e.n_pairs[b]):>5}  "
                         f"{relevance(e.sigma_mean[b], e.sigma_sem[b])}")
        classes = {}
        for b, block in enumerate(res.blocks):
            classes.setdefault(relevance(e.sigma_mean[b], e.sigma_sem[b]), []).append(block)
        lines.append("  " + "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(classes.items())))
    failed = sum(not r.ok for r in results)
    lines.append(f"{len(results)} run(s) analysed, {failed} failed.")
    return "\n".join(lines)


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
        lines.append(f"run {run.name}  [format {run.format}]  {run.path}")
        for note in run.notes:
            lines.append(f"  note: {note}")
        if item.error:
            lines.append(f"  ERROR: {item.error}")
            continue
        lines.append(f"  rounds: {_rounds_text([r.index for r in run.rounds])}")
        for rnd in run.rounds:
            metrics = " ".join(f"{k}={v:.4g}" for k, v in rnd.metrics.items())
            files = ", ".join(str(p) for p in rnd.files)
            lines.append(f"    {rnd.index:>3}  {files}" + (f"  [{metrics}]" if metrics else ""))
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
