"""Flow math against hand-computed values and an independent regression (scipy)."""

import math

import numpy as np
import polars as pl
import pytest
from scipy import stats

from flowscan import flow


def test_shares_divide_by_row_sums_and_leave_empty_rows_undefined():
    m = flow.shares(np.array([[1.0, 3.0], [0.0, 0.0]]))
    assert m[0].tolist() == [0.25, 0.75]
    assert np.isnan(m[1]).all()


def test_coarse_graining_matches_the_bert_schedule():
    # 10 % of the original count per round: x(n) = 1/(10 - n), so c(2) = 8/7 (Redman et al. App. A)
    density = np.array([1.0, 0.9, 0.8, 0.7])
    x, c = flow.coarse_graining(density)
    assert x == pytest.approx([1 / 10, 1 / 9, 1 / 8], abs=1e-15)
    assert c[2] == pytest.approx(8 / 7, abs=1e-15)


def test_step_exponents_hand_values_and_invalid_steps():
    share = np.array([[0.5, 0.5, 0.0], [0.4, 0.6, 0.0], [0.3, 0.7, 0.0], [0.3, 0.7, 0.0]])
    c = np.array([1.25, 1.25, 1.0])
    lam, sigma, valid = flow.step_exponents(share, c)
    assert lam[0, 0] == pytest.approx(0.8)
    assert sigma[0, 1] == pytest.approx(math.log(1.2) / math.log(1.25))
    assert valid.tolist() == [[True, True, False], [True, True, False], [False, False, False]]
    assert np.isnan(sigma[2]).all() and np.isnan(lam[:, 2]).all()  # c = 1 and M = 0


def test_mean_sem_uses_ddof_one_over_valid_entries_only():
    values = np.array([[1.0], [2.0], [4.0], [100.0]])
    valid = np.array([[True], [True], [True], [False]])
    mean, sem, count = flow.mean_sem(values, valid)
    assert mean[0] == pytest.approx(7 / 3)
    assert sem[0] == pytest.approx(np.std([1, 2, 4], ddof=1) / math.sqrt(3))
    assert count[0] == 3
    mean1, sem1, _ = flow.mean_sem(np.array([[3.0]]), np.array([[True]]))
    assert mean1[0] == 3.0 and np.isnan(sem1[0])


def test_fit_line_agrees_with_scipy_linregress():
    rng = np.random.default_rng(0)
    x = np.cumsum(rng.uniform(0.1, 0.3, 9))
    y = 0.7 - 0.4 * x + rng.normal(0, 0.01, 9)
    fit = flow.fit_line(x, y)
    ref = stats.linregress(x, y)
    assert fit.slope == pytest.approx(ref.slope, rel=1e-12)
    assert fit.slope_se == pytest.approx(ref.stderr, rel=1e-10)
    assert fit.r2 == pytest.approx(ref.rvalue ** 2, rel=1e-12)


def test_fit_lines_fits_each_column_on_its_own_finite_pairs_as_linregress_does():
    rng = np.random.default_rng(1)
    x = np.cumsum(rng.uniform(0.1, 0.3, (10, 4)), axis=0)
    y = 0.3 + 0.5 * x + rng.normal(0, 0.05, (10, 4))
    y[[1, 6], 0] = np.nan        # holes in one column only
    x[3, 2] = np.inf
    y[:, 3] = np.nan
    y[:2, 3] = [1.0, 2.0]        # two points: a slope without a standard error
    fits = flow.fit_lines(x, y)
    for j in range(3):
        keep = np.isfinite(x[:, j]) & np.isfinite(y[:, j])
        ref = stats.linregress(x[keep, j], y[keep, j])
        assert fits[j].n == keep.sum()
        assert fits[j].slope == pytest.approx(ref.slope, rel=1e-12)
        assert fits[j].slope_se == pytest.approx(ref.stderr, rel=1e-10)
        assert fits[j].r2 == pytest.approx(ref.rvalue ** 2, rel=1e-12)
    assert fits[3].n == 2 and fits[3].slope == pytest.approx(1 / (x[1, 3] - x[0, 3])) and np.isnan(fits[3].slope_se)
    shared = flow.fit_lines(x[:, :1], y[:, :2])   # one x column for every y column
    assert shared[1].slope == pytest.approx(stats.linregress(x[:, 0], y[:, 1]).slope, rel=1e-12)


def test_fit_exponents_recovers_sigma_under_a_varying_c():
    # M(n) = M0 * D(n)^(-sigma): with s(n) = ln(D0/D(n)), ln M = ln M0 + sigma * s exactly
    density = np.array([1.0, 0.9, 0.8, 0.7, 0.6])
    share = np.stack([0.3 * density ** -0.25, 1 - 0.3 * density ** -0.25], axis=1)
    fits = flow.fit_exponents(share, density)
    assert fits[0].slope == pytest.approx(0.25, abs=1e-12)
    assert fits[0].r2 == pytest.approx(1.0)


def test_compute_flow_hand_example_with_a_missing_round():
    # rounds 0, 1, 3: the step 1 -> 3 spans two rounds, its c measured from the masks (0.8 / 0.5)
    f = flow.compute_flow(rounds=[0, 1, 3], n_params=[10, 30],
                          n_unpruned=[[10, 30], [8, 24], [5, 15]],
                          abs_sum=[[5.0, 15.0], [4.0, 16.0], [1.0, 3.0]])
    assert f.density.tolist() == pytest.approx([1.0, 0.8, 0.5])
    assert f.step_rounds.tolist() == [0, 1]
    assert f.step_span.tolist() == [1, 2]
    assert f.c.tolist() == pytest.approx([1.25, 1.6])
    lam, sigma, valid = f.steps["M"]
    assert lam[0].tolist() == pytest.approx([0.2 / 0.25, 0.8 / 0.75])
    assert lam[1].tolist() == pytest.approx([0.25 / 0.2, 0.75 / 0.8])
    assert sigma[0, 0] == pytest.approx(math.log(0.8) / math.log(1.25))
    assert sigma[1, 0] == pytest.approx(math.log(1.25) / math.log(1.6))
    assert f.P[:, 0].tolist() == pytest.approx([0.25, 0.25, 0.25])
    e = flow.eigen_summary(f, "M")
    assert e.n_pairs.tolist() == [2, 2]
    assert e.sigma_mean[0] == pytest.approx((math.log(0.8) / math.log(1.25) + math.log(1.25) / math.log(1.6)) / 2)
    # the fit uses every round at once, gap included: s = ln(1/D)
    expected = stats.linregress(np.log(1 / np.array([1.0, 0.8, 0.5])), np.log([0.25, 0.2, 0.25])).slope
    assert e.fits[0].slope == pytest.approx(expected, rel=1e-12)
    # lambda is averaged per round: the two-round step counts as its square root
    assert e.lambda_mean[0] == pytest.approx((0.8 + math.sqrt(1.25)) / 2)
    assert e.lambda_sem[0] == pytest.approx(abs(0.8 - math.sqrt(1.25)) / 2)


def _one_block_flow(log_share_of_round, rounds=12, rate=0.8):
    """A run whose block 0 has ln share = f(round) (block 1 the rest), pruned at a constant rate."""
    r = np.arange(rounds)
    n_unpruned = np.stack([np.round(1e6 * rate ** r)] * 2, axis=1).astype(np.int64)
    share = np.exp(log_share_of_round(r.astype(float)))
    return flow.compute_flow(r, np.array([10 ** 6] * 2), n_unpruned, np.stack([share, 1.0 - share], axis=1))


def test_a_flat_noisy_block_is_one_exponential():
    # sigma = 0 with noise: the sigma_fit line's R² is near 0, yet nothing drifts or curves
    rng = np.random.default_rng(4)
    noise = rng.normal(0, 0.01, 12)
    e = flow.eigen_summary(_one_block_flow(lambda r: np.log(0.3) + noise[r.astype(int)]), "M")
    assert e.fits[0].r2 < 0.5
    assert e.exponential_ok[0]


@pytest.mark.parametrize("log_share, ok", [
    (lambda r: np.log(0.05) + 0.3 * r * np.log(1.25), True),           # sigma = 0.3 throughout
    (lambda r: np.log(0.05) + 0.02 * r ** 2, False),                    # the exponent grows: curved
    (lambda r: np.log(0.3) - 0.004 * (r - 5.5) ** 2, False),            # a flat block that bends
])
def test_exponential_ok_is_judged_against_the_noise_not_r2(log_share, ok):
    e = flow.eigen_summary(_one_block_flow(log_share), "M")
    assert bool(e.exponential_ok[0]) is ok


def test_curvature_and_its_p_value_agree_with_a_quadratic_regression():
    rng = np.random.default_rng(5)
    x = np.linspace(0, 3, 9)
    y = 0.2 + 0.5 * x + 0.1 * x ** 2 + rng.normal(0, 0.05, 9)
    q, t, df = flow.curvature_terms(x, np.stack([y, np.where(x > 2.5, np.nan, y)], axis=1))
    p = [flow.curvature_p_value(*v) for v in zip(q, t, df)]
    design = np.column_stack([np.ones(9), x, x ** 2])
    coef, res, *_ = np.linalg.lstsq(design, y, rcond=None)
    se = math.sqrt(res[0] / 6 * np.linalg.inv(design.T @ design)[2, 2])
    assert q[0] == pytest.approx(coef[2], rel=1e-9)
    assert p[0] == pytest.approx(2 * stats.t.sf(abs(coef[2] / se), 6), rel=1e-6)
    assert math.isfinite(q[1])   # fitted on its own finite points


def test_a_block_that_is_never_pruned_has_that_verdict():
    f = flow.compute_flow([0, 1, 2], [10, 10], [[10, 10], [10, 8], [10, 6]], [[5.0, 5.0], [5.0, 4.0], [5.0, 3.0]])
    for quantity in ("M", "P"):
        assert flow.eigen_summary(f, quantity).relevance[0] == "never_pruned"
    assert flow.relevance(1.0, 0.0, never_pruned=True) == "never_pruned"


@pytest.mark.parametrize("mean, sem, expected", [
    (0.2, 0.05, "relevant"), (-0.2, 0.05, "irrelevant"), (0.05, 0.05, "marginal"),
    (0.1, float("nan"), "undetermined"), (float("nan"), 0.1, "undetermined"),
    (-3.0, float("nan"), "undetermined")])
def test_relevance_accounts_for_the_sem(mean, sem, expected):
    assert flow.relevance(mean, sem) == expected


def test_exponential_ok_fails_when_sigma_drifts_and_holds_for_a_true_exponential(tmp_path):
    from conftest import FIXTURES, analyze
    from flowscan import flow as fl

    eigen = analyze(FIXTURES / "closed-form" / "safetensors", tmp_path / "out")["eigen"].filter(quantity="M")
    exact = eigen.filter(pl.col("block") != "rest")        # sigma = 0.5 and -1 by construction
    assert exact["exponential_ok"].all() and (exact["sigma_trend_p"] >= 0.05).all()
    rest = eigen.filter(block="rest").row(0, named=True)   # the remainder's share is no exponential:
    assert not rest["exponential_ok"] and rest["sigma_trend_p"] < 0.05   # caught, where eigen_ok passes
    assert rest["eigen_ok"]

    rounds = np.arange(8)
    n_params = np.array([1000, 1000])
    n_unpruned = np.stack([np.round(1000 * 0.8 ** rounds)] * 2, axis=1).astype(np.int64)
    drifting = np.stack([np.exp(0.3 * rounds.astype(float) ** 2), np.ones(8)], axis=1)
    bad = fl.eigen_summary(fl.compute_flow(rounds, n_params, n_unpruned, drifting), "M")
    assert not bad.exponential_ok[0] and bad.trend_p[0] < 0.05 and abs(bad.drift[0]) > 0.25 * abs(bad.sigma_mean[0])
    assert bad.eigen_ok[0] == (bad.lambda_sem[0] / bad.lambda_mean[0] < 0.05)   # the paper's test, unchanged


def test_trend_p_value_equals_scipy_stats_linregress():
    rng = np.random.default_rng(3)
    for n in (3, 5, 12):
        x = np.arange(n, dtype=float)
        y = 0.1 * x + rng.normal(size=n)
        ref = stats.linregress(x, y)
        assert flow.slope_p_value(flow.fit_line(x, y)) == pytest.approx(ref.pvalue, rel=1e-12)


def test_the_t_p_value_equals_scipys_over_its_range():
    from scipy.special import stdtr

    for df in (1, 2, 3, 5, 8, 13, 30, 100, 1000):
        for t in (0.0, 1e-6, 0.1, 0.5, 1.0, 2.0, 3.5, 7.0, 20.0, 80.0):
            expected = float(2 * stdtr(df, -abs(t)))
            got = flow.t_two_sided_p(t, df)
            assert got == pytest.approx(expected, rel=1e-10, abs=1e-300), (df, t)
    assert flow.t_two_sided_p(float("inf"), 5) == 0.0 and math.isnan(flow.t_two_sided_p(float("nan"), 5))
