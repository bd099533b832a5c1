"""What changed between two scans of an archive in progress (`flowscan analyze --watch`).

Pure functions over two lists of RunResults; the command does the scanning, sleeping and printing.
"""

from __future__ import annotations

import math
from typing import Sequence

from flowscan.pipeline import RunResult

SIGMA_MOVED = 1e-9   # below this, a sigma is the same number computed again


def _sigmas(res: RunResult) -> dict[str, tuple[float, float, str]]:
    if not res.ok or res.flow is None:
        return {}
    e = res.eigen["M"]
    verdicts = e.relevance
    return {block: (float(e.sigma_mean[b]), float(e.sigma_sem[b]), verdicts[b]) for b, block in enumerate(res.blocks)}


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= SIGMA_MOVED


def changes(before: Sequence[RunResult], after: Sequence[RunResult]) -> list[str]:
    """One line per change: new runs, new rounds, runs that failed or recovered, sigmas that moved,
    verdicts that changed."""
    old = {r.run.name: r for r in before}
    lines = []
    for res in after:
        name = res.run.name
        prev = old.get(name)
        if prev is None:
            lines.append(f"run {name}: new, rounds {_span(res.run.complete_rounds)}")
            continue
        new_rounds = sorted(set(res.run.complete_rounds) - set(prev.run.complete_rounds))
        if new_rounds:
            lines.append(f"run {name}: new round(s) {', '.join(map(str, new_rounds))}")
        if res.ok != prev.ok:
            lines.append(f"run {name}: " + (f"failed: {res.error}" if not res.ok else "reads again"))
        was, now = _sigmas(prev), _sigmas(res)
        for block, (mean, sem, new_class) in now.items():
            if block not in was:
                continue
            old_mean, old_sem, old_class = was[block]
            if not _same(mean, old_mean):
                lines.append(f"run {name}: sigma({block}) {_pm(old_mean, old_sem)} -> {_pm(mean, sem)}")
            if old_class != new_class:
                lines.append(f"run {name}: {block} {old_class} -> {new_class}")
    gone = sorted(set(old) - {r.run.name for r in after})
    lines += [f"run {name}: no longer found" for name in gone]
    return lines


def _pm(mean: float, sem: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:+.4f} ± {sem:.4f}" if math.isfinite(sem) else f"{mean:+.4f}"


def _span(rounds: Sequence[int]) -> str:
    return f"{rounds[0]}-{rounds[-1]}" if rounds else "none yet"
