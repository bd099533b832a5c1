"""Matching: whether a pruned network is as good as the dense one. One definition for every
command that decides it (lmc, sharpness --probe, produce's adaptive schedule):

- the **dense error** of a run is the test error of that run's own round 0 (its dense network)
  as stored — its own weights and BatchNorm statistics —, measured by flowscan, which checks it
  against the accuracy the archive recorded (`--accuracy-tolerance`). `lmc` and `sharpness --probe`
  take it the same way (`landscape.analysis.dense_errors`); a run without a complete round 0 has
  no dense error, and its matching is unknown (named, never taken from its first round);
- a network is **matching** when its error, measured the same way, is at most the dense error
  plus the tolerance.

The split is the test set, except in produce's adaptive schedule, which decides while the archive
is made and must not look at the test set it reports: it applies the same rule to a validation
split held out of training.
"""

from __future__ import annotations

import math


def is_matching(error: float, dense_error: float, tolerance: float) -> bool | None:
    """error <= dense_error + tolerance; None when either error is unknown (NaN)."""
    if not (math.isfinite(error) and math.isfinite(dense_error)):
        return None
    return error <= dense_error + tolerance
