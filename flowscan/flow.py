"""Flow math of Redman et al. (2022), docs/definitions.md: pure functions on reduced sums, no I/O.

Shapes: R rounds (rows, in increasing round order) x B blocks (columns).
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from functools import cached_property

import numpy as np

EIGEN_SEM_RATIO = 0.05  # the paper's test: SEM of lambda < 5 % of its mean
TREND_ALPHA = 0.05      # exponential_ok: neither sigma's drift over the rounds nor the curvature of
DRIFT_FRACTION = 0.25   # ln share in the scale is both significant (p-value) and material (a change
DRIFT_FLOOR = 0.2       # across the run above this share of max(|sigma|, DRIFT_FLOOR))


def shares(values: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (NaN where the row sums to 0): M from abs sums, P from counts."""
    values = np.asarray(values, dtype=np.float64)
    total = values.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, values / np.where(total > 0, total, 1.0), np.nan)


def global_density(n_unpruned: np.ndarray, n_params: np.ndarray) -> np.ndarray:
    """D(n): remaining fraction of the prunable set, per round."""
    return np.asarray(n_unpruned, dtype=np.float64).sum(axis=1) / float(np.sum(n_params))


def coarse_graining(density: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x(n) = 1 - D(n+1)/D(n) and c(n) = D(n)/D(n+1), for each step n -> n+1 (measured)."""
    d = np.asarray(density, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = d[1:] / d[:-1]
        return 1.0 - ratio, 1.0 / ratio


def step_exponents(share: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """lambda = share(n+1)/share(n), sigma = ln lambda / ln c, and validity, per step x block.

    A step is invalid where either share is 0 or undefined (layer collapse, an all-zero mask) or
    where c = 1 (nothing pruned), or c is not finite.
    """
    s = np.asarray(share, dtype=np.float64)
    before, after = s[:-1], s[1:]
    c = np.asarray(c, dtype=np.float64)[:, None]
    valid = (before > 0) & (after > 0) & np.isfinite(before) & np.isfinite(after) \
        & np.isfinite(c) & (c > 0) & (c != 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        lam = np.where(valid, after / np.where(valid, before, 1.0), np.nan)
        sigma = np.where(valid, np.log(lam) / np.log(np.where(valid, c, 2.0)), np.nan)
    return lam, sigma, valid


def mean_sem(values: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column: mean, SEM (ddof=1; NaN below two values) and count of the valid entries."""
    values = np.where(valid, values, np.nan)
    count = valid.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, np.nansum(values, axis=0) / np.maximum(count, 1), np.nan)
        dev = np.where(valid, values - mean, 0.0)
        var = (dev ** 2).sum(axis=0) / np.maximum(count - 1, 1)
        sem = np.where(count > 1, np.sqrt(var / np.maximum(count, 1)), np.nan)
    return mean, sem, count


@dataclass(frozen=True)
class LineFit:
    slope: float
    slope_se: float
    r2: float
    n: int


def fit_line(x: np.ndarray, y: np.ndarray) -> LineFit:
    """Ordinary least squares y = a + b x on the finite pairs."""
    return fit_lines(np.asarray(x, dtype=np.float64)[:, None], np.asarray(y, dtype=np.float64)[:, None])[0]


def fit_lines(x: np.ndarray, y: np.ndarray) -> list[LineFit]:
    """`fit_line` for each column of `y` (n x k) against the same column of `x` (n x k, or n x 1
    shared), all at once: a run has a fit per block and quantity, and one numpy pass is faster
    than k small ones."""
    y = np.asarray(y, dtype=np.float64)
    x = np.broadcast_to(np.asarray(x, dtype=np.float64), y.shape)
    keep = np.isfinite(x) & np.isfinite(y)
    n = keep.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        x_mean = np.where(keep, x, 0.0).sum(axis=0) / n
        y_mean = np.where(keep, y, 0.0).sum(axis=0) / n
        dx = np.where(keep, x - x_mean, 0.0)
        dy = np.where(keep, y - y_mean, 0.0)
        sxx = (dx ** 2).sum(axis=0)
        slope = (dx * dy).sum(axis=0) / sxx
        ssr = (np.where(keep, dy - slope * dx, 0.0) ** 2).sum(axis=0)
        sst = (dy ** 2).sum(axis=0)
        se = np.sqrt(ssr / (n - 2) / sxx)
        r2 = 1.0 - ssr / sst
    fits = []
    for j in range(y.shape[1]):
        if n[j] < 2 or sxx[j] == 0:
            fits.append(LineFit(np.nan, np.nan, np.nan, int(n[j])))
            continue
        fit_r2 = float(r2[j]) if sst[j] > 0 else (1.0 if ssr[j] == 0 else np.nan)
        fits.append(LineFit(float(slope[j]), float(se[j]) if n[j] > 2 else np.nan, fit_r2, int(n[j])))
    return fits


def slope_p_value(fit: LineFit) -> float:
    """Two-sided p-value of the hypothesis 'slope = 0' (t distribution, n - 2 degrees of freedom)."""
    if fit.n < 3 or not np.isfinite(fit.slope):
        return float("nan")
    if fit.slope_se == 0:
        return 1.0 if fit.slope == 0 else 0.0
    return t_two_sided_p(fit.slope / fit.slope_se, fit.n - 2)


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom: the regularized incomplete beta
    I_x(df/2, 1/2) at x = df / (df + t^2). Computed here (a continued fraction, Numerical Recipes'
    betacf) because importing scipy.special costs a fifth of a small analysis's start-up;
    tests/test_flow.py holds it to scipy's value."""
    if not math.isfinite(t):
        return 0.0 if not math.isnan(t) else float("nan")
    # x and 1 - x each computed directly: near t = 0, 1 - x by subtraction would lose digits
    return _betainc(df / 2.0, 0.5, df / (df + t * t), t * t / (df + t * t))


def _betainc(a: float, b: float, x: float, y: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for 0 <= x <= 1 and y = 1 - x."""
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y))
    if x < (a + 1.0) / (a + b + 2.0):   # where the continued fraction converges fast
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, y) / b


def _betacf(a: float, b: float, x: float, eps: float = 1e-16, tiny: float = 1e-300) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def cumulative_log_c(density: np.ndarray) -> np.ndarray:
    """sum_{k<n} ln c(k) = ln(D(first)/D(n)): the coarse-graining scale; telescopes over gaps."""
    d = np.asarray(density, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.log(d[0] / d)


def curvature_p_value(q: float, t: float, df: float) -> float:
    if not np.isfinite(q):
        return float("nan")
    return (1.0 if q == 0 else 0.0) if not np.isfinite(t) else t_two_sided_p(t, df)


def curvature_terms(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column of `y` (n x k) against `x` (n): the quadratic term q of y = a + b x + q x² on the
    finite points, its t statistic q/SE (inf where the fit is exact) and its degrees of freedom
    n − 3 (`curvature_p_value` makes the two-sided p-value of them); NaN below 4 points.
    The slope of y changes by 2 q (x_max − x_min) across the points. Columns that share their
    finite points are solved together (one small linear system for all of a run's blocks)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    q, t, df = (np.full(y.shape[1], np.nan) for _ in range(3))
    keep = np.isfinite(x)[:, None] & np.isfinite(y)
    patterns: dict[bytes, list[int]] = {}
    for j in range(y.shape[1]):
        patterns.setdefault(keep[:, j].tobytes(), []).append(j)
    for columns in patterns.values():
        rows = keep[:, columns[0]]
        n = int(rows.sum())
        if n < 4 or len(set(x[rows].tolist())) < 3:   # a parabola needs three distinct points
            continue
        xs = x[rows] - x[rows].mean()   # centred: a better-conditioned design
        design = np.column_stack([np.ones(n), xs, xs ** 2])
        inverse = np.linalg.inv(design.T @ design)
        block = y[rows][:, columns]
        coef = inverse @ (design.T @ block)
        resid = block - design @ coef
        se = np.sqrt((resid ** 2).sum(axis=0) / (n - 3) * inverse[2, 2])
        q[columns], df[columns] = coef[2], n - 3
        with np.errstate(divide="ignore", invalid="ignore"):
            t[columns] = np.where(se > 0, coef[2] / np.where(se > 0, se, 1.0), np.inf)
    return q, t, df


def log_shares(share: np.ndarray) -> np.ndarray:
    """ln share, NaN where the share is 0 or undefined."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(share > 0, np.log(np.where(share > 0, share, 1.0)), np.nan)


def fit_exponents(share: np.ndarray, density: np.ndarray) -> list[LineFit]:
    """sigma_fit per block: slope of ln share(n) against the cumulative ln c (all rounds at once)."""
    return fit_lines(cumulative_log_c(density)[:, None], log_shares(share))


def relevance(sigma_mean: float, sigma_sem: float, never_pruned: bool = False) -> str:
    """'relevant' (sigma > 2 SEM), 'irrelevant' (sigma < -2 SEM), 'marginal' (within 2 SEM of 0), or
    'undetermined' without an error bar (fewer than two valid steps): never a verdict without one.
    A block none of whose parameters was ever pruned is 'never_pruned': its shares grow only
    because the others shrink (sigma_P = 1 exactly), which says nothing about pruning it."""
    if never_pruned:
        return "never_pruned"
    if not (np.isfinite(sigma_mean) and np.isfinite(sigma_sem)):
        return "undetermined"
    margin = 2.0 * sigma_sem
    if sigma_mean > margin:
        return "relevant"
    if sigma_mean < -margin:
        return "irrelevant"
    return "marginal"


@dataclass(frozen=True)
class Flow:
    """Everything docs/definitions.md defines for one run (rows: rounds in order; columns: blocks)."""

    rounds: np.ndarray        # R round indices
    n_params: np.ndarray      # B
    n_unpruned: np.ndarray    # R x B
    abs_sum: np.ndarray       # R x B
    M: np.ndarray
    P: np.ndarray
    block_density: np.ndarray
    density: np.ndarray       # R
    step_rounds: np.ndarray   # S = R - 1: round n of each step from n to the next round
    x: np.ndarray             # S
    c: np.ndarray             # S
    steps: dict               # quantity -> (lambda S x B, sigma S x B, valid S x B)
    step_span: np.ndarray     # S: rounds each step spans (1; more across a missing round)

    @property
    def never_pruned(self) -> np.ndarray:
        """B: blocks that keep every parameter in every round."""
        return (self.n_unpruned == self.n_params[None, :]).all(axis=0)


def compute_flow(rounds, n_params, n_unpruned, abs_sum) -> Flow:
    rounds = np.asarray(rounds, dtype=np.int64)
    n_params = np.asarray(n_params, dtype=np.int64)
    n_unpruned = np.asarray(n_unpruned, dtype=np.int64)
    abs_sum = np.asarray(abs_sum, dtype=np.float64)
    M, P = shares(abs_sum), shares(n_unpruned)
    with np.errstate(invalid="ignore", divide="ignore"):
        block_density = n_unpruned / np.where(n_params > 0, n_params, 1)
    density = global_density(n_unpruned, n_params)
    # Across a missing round the step spans several rounds: its c = D(n)/D(n+k) is measured from the
    # masks like any other, so lambda = c^sigma holds for it as for a one-round step.
    x, c = coarse_graining(density)
    steps = {quantity: step_exponents(share, c) for quantity, share in (("M", M), ("P", P))}
    return Flow(rounds, n_params, n_unpruned, abs_sum, M, P, block_density, density,
                rounds[:-1], x, c, steps, np.diff(rounds))


@dataclass(frozen=True)
class Eigen:
    """Per block summary of one quantity's steps and its exponent fit."""

    n_pairs: np.ndarray
    lambda_mean: np.ndarray
    lambda_sem: np.ndarray
    sigma_mean: np.ndarray
    sigma_sem: np.ndarray
    fits: list[LineFit]          # ln share against the cumulative ln c: slope sigma_fit
    trends: list[LineFit]        # sigma(n) against the round n: drift of the exponent
    curvature: np.ndarray        # quadratic term of ln share in the cumulative ln c ...
    curvature_t: np.ndarray      # ... its t statistic ...
    curvature_df: np.ndarray     # ... and degrees of freedom
    scale_range: np.ndarray      # range of the cumulative ln c over the block's rounds
    never_pruned: np.ndarray     # blocks that keep every parameter in every round

    @cached_property
    def trend_p(self) -> np.ndarray:
        return np.array([slope_p_value(t) for t in self.trends])

    @property
    def drift(self) -> np.ndarray:
        """Change of sigma across the run's steps, from the trend line."""
        return np.array([t.slope * (t.n - 1) if t.n > 1 else np.nan for t in self.trends])

    @cached_property   # the tables and the terminal both ask
    def exponential_ok(self) -> np.ndarray:
        """A diagnostic that can fail, unlike `eigen_ok` at c near 1: at least 3 valid steps, and the
        share is one exponential in the coarse-graining scale, judged against the run's own noise,
        never by R² (a flat block, sigma near 0, has an R² near 0 however exponential it is):
        sigma does not drift over the rounds, and ln share does not curve in the scale, where each
        departure fails only when both significant (p < 0.05) and material (a change of the local
        exponent across the run above 25 % of max(|sigma|, 0.2))."""
        with np.errstate(invalid="ignore"):
            allowed = DRIFT_FRACTION * np.maximum(np.abs(self.sigma_mean), DRIFT_FLOOR)
            drifting = (self.trend_p < TREND_ALPHA) & (np.abs(self.drift) > allowed)
            bend = np.abs(2.0 * self.curvature * self.scale_range)   # change of d ln share / d scale
            material = bend > allowed
        curved = np.zeros(len(material), dtype=bool)   # p-values only where the bend would matter
        for j in np.flatnonzero(material):
            curved[j] = curvature_p_value(self.curvature[j], self.curvature_t[j], self.curvature_df[j]) < TREND_ALPHA
        return (self.n_pairs >= 3) & ~drifting & ~curved

    @cached_property
    def relevance(self) -> list[str]:
        return [relevance(m, s, bool(n)) for m, s, n in zip(self.sigma_mean, self.sigma_sem, self.never_pruned)]

    @property
    def eigen_ok(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.isfinite(self.lambda_sem) & (self.lambda_sem / self.lambda_mean < EIGEN_SEM_RATIO)


def per_round(lam: np.ndarray, span: np.ndarray) -> np.ndarray:
    """lambda of each step normalised to one round, lambda^(1/span): a step across a missing round
    grows the share over several rounds (sigma needs no such care: its c spans them too)."""
    with np.errstate(invalid="ignore"):
        return np.asarray(lam, dtype=np.float64) ** (1.0 / np.asarray(span, dtype=np.float64)[:, None])


def eigen_summary(flow: Flow, quantity: str) -> Eigen:
    return eigen_summaries(flow, (quantity,))[quantity]


def eigen_summaries(flow: Flow, quantities: tuple[str, ...] = ("M", "P")) -> dict[str, Eigen]:
    """`Eigen` of each quantity, computed in one pass with their blocks side by side: a run's arrays
    are small, so numpy's cost per call, not per element, is what adds up (5,000 small rounds:
    a third of the time spent assembling runs)."""
    width = flow.n_params.size
    lam, sigma, valid = (np.hstack([flow.steps[q][k] for q in quantities]) for k in range(3))
    share = np.hstack([flow.M if q == "M" else flow.P for q in quantities])
    lam_mean, lam_sem, count = mean_sem(per_round(lam, flow.step_span), valid)
    sig_mean, sig_sem, _ = mean_sem(sigma, valid)
    trends = fit_lines(np.where(valid, np.asarray(flow.step_rounds, dtype=np.float64)[:, None], np.nan), sigma)
    scale = cumulative_log_c(flow.density)
    log_share = log_shares(share)
    curvature, curvature_t, curvature_df = curvature_terms(scale, log_share)
    seen = np.isfinite(log_share) & np.isfinite(scale)[:, None]
    with np.errstate(invalid="ignore"):
        spread = np.where(seen, scale[:, None], np.nan)
        scale_range = np.where(seen.any(axis=0), np.nanmax(np.where(seen, spread, -np.inf), axis=0)
                               - np.nanmin(np.where(seen, spread, np.inf), axis=0), np.nan)
    fits = fit_lines(scale[:, None], log_share)   # fit_exponents' fit, on the log shares at hand
    summaries = {}
    for k, quantity in enumerate(quantities):
        cols = slice(k * width, (k + 1) * width)
        summaries[quantity] = Eigen(count[cols], lam_mean[cols], lam_sem[cols], sig_mean[cols], sig_sem[cols],
                                    fits[cols], trends[cols], curvature[cols], curvature_t[cols],
                                    curvature_df[cols], scale_range[cols], flow.never_pruned)
    return summaries
