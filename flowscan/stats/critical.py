"""The critical exponent gamma of error against density (Redman et al. App. D, Eq. 15).

    eps(d) = eps_np * [(d^2 + p^2 (eps_dag / eps_np)^(2/gamma)) / (d^2 + p^2)]^(gamma/2)

the scaling function of Rosenfeld et al.: eps_np is the error without pruning (a free parameter
held within a tight band around the dense error, as Redman et al. did), eps_dag the error at
maximal pruning, p where the power law sets in. Errors and densities are fractions.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import polars as pl
from scipy.optimize import curve_fit

from flowscan.errors import FlowscanError
from flowscan.stats.groups import Grouping

PARAMS = ("epsilon_np", "epsilon_dagger", "gamma", "p")
# statuses whose gamma is a measurement: "ok", and gamma identified while eps_dagger, a nuisance
# parameter, sits on its bound (the chance error: the sparsest rounds never reach the plateau, so
# the data do not say where it lies; gamma does not depend on it there)
NUISANCE = ("epsilon_dagger",)
MEASURED = ("ok", "nuisance_at_bound")
BOUND_TOLERANCE = 0.01   # within 1 % of a parameter's range from a bound: the bound decided it
FLAT_SSE = 0.01          # optima within 1 % of the best SSE are equally good ...
FLAT_SPREAD = 0.25       # ... and must agree on gamma and epsilon_dagger to 25 %
# metric names treated as accuracies, in order of preference, when none is named
ACCURACY_NAMES = ("test_accuracy", "best_sa", "best_acc1", "eval_acc", "accuracy", "acc", "top1")


def _near_bound(name: str, value: float, low: float, high: float) -> bool:
    """Within BOUND_TOLERANCE of the parameter's range from a bound: linearly for the errors
    (fractions in [0, 1]), in decades for gamma and p, whose ranges span orders of magnitude."""
    if name in ("gamma", "p"):
        value, low, high = (np.log10(abs(x)) for x in (value, low, high))
        low, high = min(low, high), max(low, high)
    width = high - low
    return value - low < BOUND_TOLERANCE * width or high - value < BOUND_TOLERANCE * width


def scaling_function(d, epsilon_np, epsilon_dagger, gamma, p):
    d = np.asarray(d, dtype=np.float64)
    # the optimizer's trial points can overflow to inf: a residual it rejects, not an error to print
    with np.errstate(over="ignore", invalid="ignore"):
        ratio = (epsilon_dagger / epsilon_np) ** (2.0 / gamma)
        return epsilon_np * ((d ** 2 + p ** 2 * ratio) / (d ** 2 + p ** 2)) ** (gamma / 2.0)


class CriticalFit:
    """Least-squares fit of Eq. 15 (scipy's curve_fit) with bootstrap intervals.

    fit(density, error, groups=None) sets `gamma_`, `epsilon_np_`, `epsilon_dagger_`, `p_`, their
    `*_stderr_` (from the covariance), `gamma_ci_` (bootstrap percentile interval over groups,
    e.g. replicates, and the points within them), `rmse_`, `n_points_`, `at_bound_` (the
    parameters that ended on a bound), and `status_`/`reason_`: only a fit whose status is "ok"
    is a measurement (see `_verdict`).
    """

    def __init__(self, np_tolerance: float = 0.1, gamma_bounds: tuple[float, float] = (-20.0, -1e-3),
                 n_bootstrap: int = 200, confidence: float = 0.95, random_state: int = 0,
                 chance_error: float | None = None, epsilon_dagger: float | None = None):
        """`chance_error`: the error of guessing (1 - 1/classes), an upper bound for eps_dagger (the
        error at maximal pruning cannot exceed it); without it eps_dagger may reach max(1, 2 max err).
        `epsilon_dagger`: a value to hold eps_dagger at (then gamma, eps_np and p are fitted)."""
        self.np_tolerance = np_tolerance
        self.gamma_bounds = gamma_bounds
        self.n_bootstrap = n_bootstrap
        self.confidence = confidence
        self.random_state = random_state
        self.chance_error = chance_error
        self.epsilon_dagger = epsilon_dagger

    def _bounds(self, d, e):
        dense = e[d >= d.max() - 1e-12].mean()
        top = max(1.0, 2 * e.max()) if self.chance_error is None else max(self.chance_error, e.max() * 1.000001)
        low = [dense * (1 - self.np_tolerance), 1e-12, self.gamma_bounds[0], 1e-9]
        high = [dense * (1 + self.np_tolerance), top, self.gamma_bounds[1], 10 * d.max()]
        low[0] = max(low[0], 1e-12)
        high[0] = max(high[0], low[0] * 1.000001)
        return dense, (low, high)

    def _free(self) -> list[int]:
        """Indices of the fitted parameters (eps_dagger is left out when held fixed)."""
        return [k for k, name in enumerate(PARAMS) if not (name == "epsilon_dagger" and self.epsilon_dagger is not None)]

    def _fits(self, d, e, starts) -> list[tuple]:
        """(popt, pcov, sse) of every start that converged, best first; a fixed eps_dagger keeps its
        value in popt and a zero row and column in pcov."""
        _dense, bounds = self._bounds(d, e)
        free = self._free()
        fixed = self.epsilon_dagger

        def model(x, *values):
            full = list(values)
            if fixed is not None:
                full.insert(PARAMS.index("epsilon_dagger"), fixed)
            return scaling_function(x, *full)
        low, high = np.array(bounds[0])[free], np.array(bounds[1])[free]
        found = []
        for p0 in starts:
            p0 = np.clip(np.asarray(p0)[free], low + 1e-12, high - 1e-12)
            try:
                popt, pcov = curve_fit(model, d, e, p0=p0, bounds=(low, high), maxfev=20000)
            except (RuntimeError, ValueError):
                continue
            full, cov = np.empty(len(PARAMS)), np.zeros((len(PARAMS), len(PARAMS)))
            full[free] = popt
            cov[np.ix_(free, free)] = pcov
            if fixed is not None:
                full[PARAMS.index("epsilon_dagger")] = fixed
            sse = float(((scaling_function(d, *full) - e) ** 2).sum())
            if np.isfinite(sse):
                found.append((full, cov, sse))
        return sorted(found, key=lambda f: f[2])

    def _fit_once(self, d, e, starts):
        found = self._fits(d, e, starts)
        return found[0] if found else None

    def _starts(self, d, e):
        """Many starts: the least-squares surface of Eq. 15 has flat valleys and several optima."""
        dense = e[d >= d.max() - 1e-12].mean()
        worst = max(e.max(), dense * 1.01)
        return [np.array([dense, worst * f, g, p]) for f in (1.0, 1.5, 3.0) for g in (-0.1, -0.5, -1.0, -3.0, -10.0)
                for p in (np.quantile(d, 0.5), np.quantile(d, 0.25), d.min())]

    def _verdict(self, found, d, e) -> tuple[str, str | None]:
        """ok; nuisance_at_bound (gamma identified, but eps_dagger within 1 % of its range from a
        bound, e.g. at the chance error); at_bound (gamma, eps_np or p on a bound, or eps_dagger on
        one with gamma not identified: not a measurement); unidentified (a parameter's SE exceeds its
        value, or equally good optima disagree). After the bootstrap, a measured fit whose interval
        reaches one of gamma's bounds becomes interval_at_bound (`fit`)."""
        popt, pcov, sse = found[0]
        low, high = self._bounds(d, e)[1]
        free = {PARAMS[k] for k in self._free()}
        at_bound = [name for name, v, lo, hi in zip(PARAMS, popt, low, high)
                    if name in free and _near_bound(name, v, lo, hi)]
        self.at_bound_ = at_bound
        with np.errstate(invalid="ignore"):
            stderr = np.sqrt(np.diag(pcov))
        tie = sse * (1 + FLAT_SSE) + 1e-15
        rivals = np.array([f[0] for f in found if f[2] <= tie])

        def agree(name):
            k = PARAMS.index(name)
            return np.ptp(rivals[:, k]) <= FLAT_SPREAD * abs(popt[k]) + 1e-9
        g = PARAMS.index("gamma")
        gamma_pinned = np.isfinite(stderr[g]) and stderr[g] < abs(popt[g]) and agree("gamma")
        if at_bound:
            if set(at_bound) <= set(NUISANCE) and gamma_pinned:
                return "nuisance_at_bound", (f"gamma identified; {', '.join(at_bound)} (a nuisance parameter) "
                                             f"ended on its bound {high[PARAMS.index('epsilon_dagger')]:.4g}")
            return "at_bound", f"ended on a bound: {', '.join(at_bound)}"
        loose = [name for name, v, se in zip(PARAMS, popt, stderr)
                 if name in free and name != "epsilon_np" and not (np.isfinite(se) and se < abs(v))]
        if loose:
            return "unidentified", f"standard error exceeds the value: {', '.join(loose)}"
        flat = [name for name in ("gamma", "epsilon_dagger") if name in free and not agree(name)]
        if flat:
            return "unidentified", (f"equally good optima (SSE within {FLAT_SSE:.0%}) disagree on "
                                    f"{', '.join(flat)}: the fit does not pin them down")
        return "ok", None

    def fit(self, density: Sequence[float], error: Sequence[float], groups: Sequence | None = None) -> "CriticalFit":
        d = np.asarray(density, dtype=np.float64)
        e = np.asarray(error, dtype=np.float64)
        keep = np.isfinite(d) & np.isfinite(e) & (d > 0)
        d, e = d[keep], e[keep]
        g = np.asarray(groups)[keep] if groups is not None else None
        if d.size < len(PARAMS) + 1:
            raise ValueError(f"need at least {len(PARAMS) + 1} (density, error) points, got {d.size}")
        if np.any(e <= 0):
            raise ValueError("errors must be positive (error = 1 - accuracy)")
        found = self._fits(d, e, self._starts(d, e))
        if not found:
            raise ValueError("the scaling function could not be fitted to these points")
        popt, pcov, sse = found[0]
        self.status_, self.reason_ = self._verdict(found, d, e)
        with np.errstate(invalid="ignore"):
            stderr = np.sqrt(np.diag(pcov))
        for k, (name, value, se) in enumerate(zip(PARAMS, popt, stderr)):
            setattr(self, f"{name}_", float(value))
            fitted = k in self._free()
            setattr(self, f"{name}_stderr_", float(se) if fitted and np.isfinite(se) else math.nan)
        self.n_points_ = int(d.size)
        self.rmse_ = math.sqrt(sse / d.size)
        self.gamma_ci_, self.n_bootstrap_ok_ = self._bootstrap(d, e, g, popt)
        reached = self._interval_bound()
        if self.status_ in MEASURED and reached is not None:
            low, high = self.gamma_ci_
            self.status_ = "interval_at_bound"
            self.reason_ = (f"gamma's bootstrap {self.confidence:.0%} interval [{low:.3f}, {high:.3f}] reaches its "
                            f"bound {reached:g}: resamples of the data leave gamma unbounded")
        return self

    def _interval_bound(self) -> float | None:
        """The bound of gamma that its bootstrap interval reaches (as for the fit itself: within 1 %
        of the range in decades), or None."""
        for end in self.gamma_ci_:
            for bound in self.gamma_bounds:
                if math.isfinite(end) and _near_bound("gamma", end, *self.gamma_bounds) and \
                        abs(math.log10(abs(end)) - math.log10(abs(bound))) < 0.5:
                    return bound
        return None

    def _bootstrap(self, d, e, g, popt):
        if not self.n_bootstrap:
            return (math.nan, math.nan), 0
        rng = np.random.default_rng(self.random_state)
        labels = np.unique(g) if g is not None else None
        gammas = []
        for _ in range(self.n_bootstrap):
            if labels is not None and labels.size > 1:  # replicates, then rounds within each
                idx = np.concatenate([rng.choice(np.flatnonzero(g == lab), size=int((g == lab).sum()))
                                      for lab in rng.choice(labels, size=labels.size)])
            else:
                idx = rng.integers(0, d.size, d.size)
            if np.unique(d[idx]).size < len(PARAMS):
                continue
            fitted = self._fit_once(d[idx], e[idx], [popt])
            if fitted is not None:
                gammas.append(fitted[0][2])
        if len(gammas) < 10:
            return (math.nan, math.nan), len(gammas)
        alpha = (1 - self.confidence) / 2
        low, high = np.quantile(gammas, [alpha, 1 - alpha])
        return (float(low), float(high)), len(gammas)

    def predict(self, density) -> np.ndarray:
        return scaling_function(density, self.epsilon_np_, self.epsilon_dagger_, self.gamma_, self.p_)


SCALING_SCHEMA = {
    "level": pl.String, "name": pl.String, "metric": pl.String, "n_runs": pl.Int64, "n_points": pl.Int64,
    **{c: pl.Float64 for p in PARAMS for c in (p, f"{p}_se")},
    "gamma_ci_low": pl.Float64, "gamma_ci_high": pl.Float64, "n_bootstrap": pl.Int64, "rmse": pl.Float64,
    "status": pl.String, "error": pl.String,
    "epsilon_dagger_max": pl.Float64,      # eps_dagger's upper bound: the chance error, where known
    "epsilon_dagger_fixed": pl.Boolean,    # held at a given value (--eps-dagger), not fitted
}


POINTS_SCHEMA = {"run": pl.String, "round": pl.Int64, "density": pl.Float64, "error": pl.Float64, "metric": pl.String}


def error_points(metrics: pl.DataFrame, rounds: pl.DataFrame, metric: str | None = None,
                 is_error: bool = False) -> pl.DataFrame:
    """run, round, density, error, metric: error = 1 - accuracy at each round's global density.

    Without `metric`, each run uses the first of ACCURACY_NAMES it recorded. Percent values
    (any above 1) are scaled to fractions.
    """
    present = metrics.group_by("run").agg(pl.col("name").unique())
    chosen = {}
    for run, names in present.iter_rows():
        pick = metric if metric is not None else next((m for m in ACCURACY_NAMES if m in names), None)
        if pick is not None and pick in names:
            chosen[run] = pick
    if not chosen:
        wanted = metric or ", ".join(ACCURACY_NAMES)
        raise FlowscanError(f"no run records the metric ({wanted}) in metrics.parquet; name one with --metric")
    values = metrics.join(pl.DataFrame({"run": list(chosen), "name": list(chosen.values())}), on=["run", "name"])
    percent = values.group_by("run").agg((pl.col("value").max() > 1.0).alias("percent"))
    value = pl.col("value") / pl.when(pl.col("percent")).then(100.0).otherwise(1.0)
    density = rounds.group_by("run", "round").agg(pl.col("global_density").first().alias("density"))
    return (values.join(percent, on="run").join(density, on=["run", "round"], how="inner")
            .select("run", "round", "density", (value if is_error else 1.0 - value).alias("error"),
                    pl.col("name").alias("metric"))
            .cast(POINTS_SCHEMA).sort("run", "round"))


def read_points_csv(path) -> pl.DataFrame:
    """Points from a CSV with columns density,error[,run]."""
    frame = pl.read_csv(path)
    missing = {"density", "error"} - set(frame.columns)
    if missing:
        raise FlowscanError(f"{path}: needs columns density,error[,run]; missing {', '.join(sorted(missing))}")
    if "run" not in frame.columns:
        frame = frame.with_columns(pl.lit(".").alias("run"))
    return (frame.with_columns(pl.int_range(pl.len()).over("run").alias("round"), pl.lit("csv").alias("metric"))
            .select(list(POINTS_SCHEMA)).cast(POINTS_SCHEMA))


def fit_scaling(points: pl.DataFrame, grouping: Grouping = Grouping(), progress=None,
                classes: dict[str, int] | None = None, **fit_options) -> pl.DataFrame:
    """scaling table: one fit per run and one per experiment (its replicates pooled);
    `progress(text)` hears of each fit as it starts (the bootstrap makes them slow). `classes`:
    the number of classes of each run's task, which bounds eps_dagger by the chance error."""
    points = points.join(grouping.membership(points["run"].unique().to_list()), on="run")
    groups = [(level, name[0], part) for level in ("run", "experiment")
              for name, part in sorted(points.group_by(level), key=lambda kv: kv[0][0])]
    rows = []
    for k, (level, name, part) in enumerate(groups, 1):
        if progress:
            progress(f"fitting {k}/{len(groups)}: {level} {name}")
        metric = ",".join(sorted(part["metric"].unique().to_list()))
        known = [classes[r] for r in part["run"].unique().to_list() if classes and r in classes]
        chance = max(1 - 1 / n for n in known) if known else None
        rows.append(_fit_row(level, name, metric, part, {**fit_options, "chance_error": chance}))
    return pl.DataFrame(rows, schema=SCALING_SCHEMA, orient="row") if rows else pl.DataFrame(schema=SCALING_SCHEMA)


def _fit_row(level: str, name: str, metric: str, part: pl.DataFrame, options) -> tuple:
    n_runs = part["run"].n_unique()
    bound = (options.get("chance_error") or math.nan, options.get("epsilon_dagger") is not None)
    try:
        fit = CriticalFit(**options).fit(part["density"].to_numpy(), part["error"].to_numpy(),
                                         part["run"].to_numpy())
    except ValueError as exc:
        nan = [math.nan] * (2 * len(PARAMS) + 2)
        return (level, name, metric, n_runs, part.height, *nan, 0, math.nan, "error", str(exc), *bound)
    values = [v for p in PARAMS for v in (getattr(fit, f"{p}_"), getattr(fit, f"{p}_stderr_"))]
    return (level, name, metric, n_runs, fit.n_points_, *values, *fit.gamma_ci_, fit.n_bootstrap_ok_,
            fit.rmse_, fit.status_, fit.reason_, *bound)


def run_classes(metrics: pl.DataFrame) -> dict[str, int]:
    """Each run's number of classes, where its archive recorded one (`n_classes`, written by produce)."""
    found = metrics.filter(pl.col("name") == "n_classes").group_by("run").agg(pl.col("value").max())
    return {run: int(v) for run, v in found.iter_rows() if v and v >= 2}
