"""Statistics over the tables: experiments, the critical exponent fit, universality comparison."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from flowscan.stats import CriticalFit, Grouping, aggregate, compare, fit_scaling, scaling_function
from flowscan.stats.compare import sigma_table
from flowscan.stats.critical import MEASURED, error_points

TRUE = dict(epsilon_np=0.08, epsilon_dagger=0.9, gamma=-1.5, p=0.02)


def _noisy_points(seed, n_runs=3, noise=0.01):
    rng = np.random.default_rng(seed)
    density = 0.8 ** np.arange(25)                      # 25 IMP rounds at 20 % per round
    runs, d, e = [], [], []
    for r in range(n_runs):
        clean = scaling_function(density, **TRUE)
        runs += [f"seed{r}"] * density.size
        d += list(density)
        e += list(clean * (1 + noise * rng.standard_normal(density.size)))
    return np.array(runs), np.array(d), np.array(e)


def test_scaling_function_limits():
    # no pruning: eps_np; maximal pruning (d -> 0): eps_dagger
    assert scaling_function(1e6, **TRUE) == pytest.approx(TRUE["epsilon_np"], rel=1e-9)
    assert scaling_function(1e-9, **TRUE) == pytest.approx(TRUE["epsilon_dagger"], rel=1e-6)


def test_critical_fit_recovers_known_parameters_from_noisy_data():
    runs, d, e = _noisy_points(0)
    fit = CriticalFit(n_bootstrap=60, random_state=1).fit(d, e, groups=runs)
    assert fit.gamma_ == pytest.approx(TRUE["gamma"], rel=0.1)
    assert fit.p_ == pytest.approx(TRUE["p"], rel=0.15)
    assert fit.epsilon_dagger_ == pytest.approx(TRUE["epsilon_dagger"], rel=0.1)
    assert fit.epsilon_np_ == pytest.approx(TRUE["epsilon_np"], rel=0.05)
    assert 0 < fit.gamma_stderr_ < 0.3
    low, high = fit.gamma_ci_
    assert low < TRUE["gamma"] < high and high - low < 1.0
    assert fit.n_points_ == d.size and fit.n_bootstrap_ok_ >= 50
    assert fit.rmse_ < 0.02
    np.testing.assert_allclose(fit.predict([1.0]), scaling_function([1.0], fit.epsilon_np_, fit.epsilon_dagger_,
                                                                    fit.gamma_, fit.p_))


def test_critical_fit_without_noise_is_exact():
    density = 0.8 ** np.arange(20)
    fit = CriticalFit(n_bootstrap=0).fit(density, scaling_function(density, **TRUE))
    assert fit.gamma_ == pytest.approx(TRUE["gamma"], rel=1e-4)
    assert math.isnan(fit.gamma_ci_[0])


def test_critical_fit_needs_enough_points():
    with pytest.raises(ValueError, match="at least 5"):
        CriticalFit().fit([1.0, 0.8, 0.6], [0.1, 0.1, 0.2])


def test_fit_scaling_per_run_and_per_experiment_from_tables():
    runs, d, e = _noisy_points(3)
    rounds = pl.DataFrame({"run": runs, "round": np.tile(np.arange(25), 3), "global_density": d, "block": "x"})
    metrics = pl.DataFrame({"run": runs, "round": np.tile(np.arange(25), 3), "name": "test_accuracy",
                            "value": 100 * (1 - e)})  # percent accuracies
    points = error_points(metrics, rounds)
    assert points["error"].to_numpy() == pytest.approx(e)
    table = fit_scaling(points, n_bootstrap=30)
    assert table["level"].to_list() == ["run"] * 3 + ["experiment"]
    pooled = table.filter(level="experiment").row(0, named=True)
    assert pooled["name"] == "." and pooled["n_runs"] == 3 and pooled["n_points"] == 75
    assert pooled["gamma"] == pytest.approx(TRUE["gamma"], rel=0.1)
    assert pooled["status"] == "ok" and pooled["metric"] == "test_accuracy"


def test_a_fit_that_ends_on_a_bound_is_flagged():
    density = 0.8 ** np.arange(6)
    fit = CriticalFit(n_bootstrap=0).fit(density, 0.1 + 0.01 * np.arange(6))  # a line: no power law
    table = fit_scaling(pl.DataFrame({"run": ["r"] * 6, "round": range(6), "density": density,
                                      "error": 0.1 + 0.01 * np.arange(6), "metric": "m"}), n_bootstrap=0)
    assert fit.at_bound_ and table["status"][0] == "at_bound" and "gamma" in table["error"][0]


def _eigen(rows, never=()):
    frame = pl.DataFrame(rows, schema=["run", "block", "quantity", "sigma_mean", "sigma_sem", "lambda_mean",
                                       "sigma_fit"], orient="row")
    verdict = pl.when(pl.col("block").is_in(list(never))).then(pl.lit("never_pruned")).otherwise(pl.lit("marginal"))
    return frame.with_columns(verdict.alias("relevance"))


def test_grouping_of_replicates():
    g = Grouping()
    assert g.experiment_of("lottery_ab/replicate_2") == "lottery_ab"
    assert g.experiment_of("r20/c10/seed-3") == "r20/c10"
    assert g.experiment_of("seed3") == "."
    assert g.experiment_of("cifar10") == "cifar10"
    assert Grouping(regex=r"^(\w+)_s\d").experiment_of("c10_s1") == "c10"
    mapping = Grouping(mapping={"a": {"experiment": "E", "task": "cifar10"}})
    assert mapping.experiment_of("a") == "E"
    assert mapping.membership(["a"]).row(0) == ("a", "E", "cifar10", None)


def _steps(rows):
    """Steps of one round each unless a row gives its span (an eighth value)."""
    rows = [tuple(r) + (1,) * (8 - len(r)) for r in rows]
    return pl.DataFrame(rows, schema={"run": pl.String, "block": pl.String, "quantity": pl.String,
                                      "round": pl.Int64, "lambda": pl.Float64, "sigma": pl.Float64,
                                      "valid": pl.Boolean, "span": pl.Int64}, orient="row")


def test_aggregate_pools_the_steps_of_all_replicates():
    eigen = _eigen([("e/seed0", "l1", "M", 0.2, 0.01, 1.05, 0.21), ("e/seed1", "l1", "M", 0.4, 0.01, 1.09, 0.39),
                    ("e/seed0", "l2", "M", -0.3, 0.01, 0.9, -0.3), ("e/seed1", "l2", "M", -0.1, 0.01, 0.97, -0.1),
                    ("f", "l1", "M", 0.5, 0.02, 1.1, 0.5)])
    runs = pl.DataFrame({"run": ["e/seed0", "e/seed1", "f"], "status": ["ok"] * 3})
    l1 = {"e/seed0": [0.1, 0.3, 0.2], "e/seed1": [0.5, 0.3]}
    steps = _steps([(run, "l1", "M", k, 1.0 + s, s, True) for run, values in l1.items() for k, s in enumerate(values)]
                   + [("e/seed0", "l1", "M", 9, float("nan"), float("nan"), False),   # invalid: left out
                      ("e/seed0", "l2", "M", 0, 0.9, -0.3, True), ("e/seed1", "l2", "M", 0, 0.97, -0.1, True),
                      ("f", "l1", "M", 0, 1.1, 0.5, True)])
    ex = aggregate(eigen, runs, steps)
    row = ex.filter(experiment="e", block="l1").row(0, named=True)
    pooled = [0.1, 0.3, 0.2, 0.5, 0.3]
    assert row["n_runs"] == 2 and row["n_steps"] == 5
    assert row["sigma_mean"] == pytest.approx(np.mean(pooled))
    assert row["sigma_pooled_sem"] == pytest.approx(np.std(pooled, ddof=1) / math.sqrt(5))
    assert row["sigma_between_sem"] == pytest.approx(np.std([0.2, 0.4], ddof=1) / math.sqrt(2))
    # the seeds disagree more than the pooled steps say: the verdict's error bar is the larger one
    assert row["sigma_sem"] == pytest.approx(row["sigma_between_sem"]) and row["sigma_between_sem"] > row["sigma_pooled_sem"]
    assert row["lambda_mean"] == pytest.approx(1 + np.mean(pooled)) and row["sigma_fit_mean"] == pytest.approx(0.3)
    assert ex.filter(experiment="e")["block"].to_list() == ["l1", "l2"]  # model order kept
    single = ex.filter(experiment="f").row(0, named=True)
    assert single["n_runs"] == 1 and math.isnan(single["sigma_sem"])


def test_compare_distances_agreement_and_classes():
    sig = pl.DataFrame({
        "unit": ["A"] * 3 + ["B"] * 3 + ["C"] * 3,
        "block": ["l1", "l2", "l3"] * 3,
        "sigma": [0.20, 0.14, -0.68, 0.21, 0.15, -0.60, -0.3, 0.4, 0.5],
        "sigma_sem": [0.01] * 9})
    pairs, classes = compare(sig, threshold=0.1)
    ab = pairs.filter(a="A", b="B").row(0, named=True)
    assert ab["euclidean"] == pytest.approx(math.sqrt(0.01 ** 2 + 0.01 ** 2 + 0.08 ** 2))
    assert ab["rms"] == pytest.approx(ab["euclidean"] / math.sqrt(3))
    va, vb = np.array([0.20, 0.14, -0.68]), np.array([0.21, 0.15, -0.60])
    assert ab["cosine_distance"] == pytest.approx(1 - va @ vb / np.linalg.norm(va) / np.linalg.norm(vb))
    assert ab["relevance_agree"] and ab["n_conflicts"] == 0 and ab["same_class"]
    ac = pairs.filter(a="A", b="C").row(0, named=True)
    assert not ac["relevance_agree"] and ac["conflict_blocks"] == "l1, l3" and not ac["same_class"]
    assert classes["A"] == classes["B"] != classes["C"]


def test_compare_uses_only_shared_blocks_and_sigma_table_reads_eigen():
    eigen = _eigen([("x", "l1", "M", 0.1, 0.0, 1.0, 0.1), ("x", "l2", "M", 0.3, 0.0, 1.0, 0.3),
                    ("y", "l1", "M", 0.1, 0.0, 1.0, 0.1), ("y", "l2", "P", 9.0, 0.0, 1.0, 9.0)])
    pairs, _ = compare(sigma_table(eigen, "run", "M"))
    assert pairs.row(0, named=True)["n_shared_blocks"] == 1 and pairs["euclidean"][0] == 0.0


@pytest.mark.parametrize("suffix", [".csv", ".toml"])
def test_run_mapping_files(tmp_path, suffix):
    from flowscan.stats.groups import read_mapping

    path = tmp_path / f"map{suffix}"
    if suffix == ".csv":
        path.write_text("run,experiment,task,architecture\nseed0,r20-c10,cifar10,resnet20\nx,,svhn,\n")
    else:
        path.write_text('["seed0"]\nexperiment = "r20-c10"\ntask = "cifar10"\narchitecture = "resnet20"\n'
                        '["x"]\ntask = "svhn"\n')
    g = Grouping.from_file(path)
    assert g.membership(["seed0", "x"]).rows() == [("seed0", "r20-c10", "cifar10", "resnet20"),
                                                   ("x", "x", "svhn", None)]
    bad = tmp_path / "bad.csv"
    bad.write_text("name,experiment\na,b\n")
    with pytest.raises(Exception, match="'run' column"):
        read_mapping(bad)


def test_pooled_sem_matches_a_recomputation_from_steps_parquet(tmp_path):
    import shutil

    from conftest import FIXTURES, analyze, run_cli

    root = tmp_path / "task"
    for seed in ("seed0", "seed1"):
        shutil.copytree(FIXTURES / "torch-prune" / "seed0", root / seed)
    out = tmp_path / "out"
    tables = analyze(root, out)
    run_cli("aggregate", out)
    ex = pl.read_parquet(out / "experiments.parquet").filter(quantity="M")
    steps = tables["steps"].filter(pl.col("valid") & (pl.col("quantity") == "M"))
    for row in ex.iter_rows(named=True):
        sigma = steps.filter(block=row["block"])["sigma"].to_numpy()
        assert row["n_steps"] == sigma.size
        assert row["sigma_mean"] == pytest.approx(sigma.mean())
        assert row["sigma_sem"] == pytest.approx(sigma.std(ddof=1) / math.sqrt(sigma.size))
        assert row["sigma_between_sem"] == pytest.approx(0.0, abs=1e-12)   # identical seeds


def test_a_fit_where_gamma_is_not_identified_is_not_ok():
    # only the flat, high-density part of the curve, with noise: the power law is never reached
    rng = np.random.default_rng(4)
    density = np.tile(0.8 ** np.arange(6), 3)
    error = scaling_function(density, **TRUE) + rng.normal(0, 0.004, density.size)
    fit = CriticalFit(n_bootstrap=0).fit(density, error)
    assert fit.status_ in ("unidentified", "at_bound"), (fit.status_, fit.gamma_, fit.gamma_stderr_)
    assert fit.reason_
    table = fit_scaling(pl.DataFrame({"run": ["r"] * density.size, "round": range(density.size),
                                      "density": density, "error": error, "metric": "m"}), n_bootstrap=0)
    from flowscan.summary import scaling_text
    text = scaling_text(table)
    # nothing identifiable: the fit's row still shows its numbers beside its status and its own reason,
    # and a closing sentence says that no fit measures gamma
    row = text.splitlines()[1]
    assert row.split()[:3] == ["run", "r", fit.status_] and fit.reason_.split(":")[0] in row
    assert text.splitlines()[-1].startswith("No fit measures gamma")


def test_eps_dagger_near_chance_leaves_gamma_identified_and_in_its_interval():
    # a 10-class task: errors cannot exceed chance (0.9); the sparsest rounds stay well below it
    true = {**TRUE, "epsilon_dagger": 0.89}
    covered, statuses = 0, []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        density = np.tile(0.8 ** np.arange(25), 3)          # errors reach about 0.49: short of the plateau
        error = scaling_function(density, **true) + rng.normal(0, 0.004, density.size)
        runs = np.repeat(["a", "b", "c"], 25)
        fit = CriticalFit(n_bootstrap=60, random_state=1, chance_error=0.9).fit(density, error, groups=runs)
        statuses.append(fit.status_)
        assert fit.epsilon_dagger_ <= 0.9 + 1e-12
        covered += fit.gamma_ci_[0] < true["gamma"] < fit.gamma_ci_[1]
    assert set(statuses) <= {"ok", "nuisance_at_bound"}, statuses
    assert "nuisance_at_bound" in statuses     # the case the status exists for does occur here
    assert covered >= 8, covered               # a 95 % interval: about 9.5 of 10 expected


def test_a_fixed_eps_dagger_is_held_and_gamma_still_recovered():
    runs, d, e = _noisy_points(0)
    fit = CriticalFit(n_bootstrap=40, random_state=1, epsilon_dagger=TRUE["epsilon_dagger"]).fit(d, e, groups=runs)
    assert fit.epsilon_dagger_ == TRUE["epsilon_dagger"] and math.isnan(fit.epsilon_dagger_stderr_)
    assert fit.status_ == "ok" and abs(fit.gamma_ - TRUE["gamma"]) < 4 * fit.gamma_stderr_
    free = CriticalFit(n_bootstrap=40, random_state=1).fit(d, e, groups=runs)
    assert free.gamma_ci_[0] < fit.gamma_ < free.gamma_ci_[1]


def test_nuisance_at_bound_is_told_apart_from_a_fit_that_pins_nothing():
    # the sparsest rounds are far from eps_dagger's plateau, which is cut off by a low bound
    density = np.tile(0.8 ** np.arange(30), 2)
    error = scaling_function(density, **{**TRUE, "epsilon_dagger": 0.895}) + \
        np.random.default_rng(5).normal(0, 0.004, density.size)
    bounded = CriticalFit(n_bootstrap=0, chance_error=0.9).fit(density, error)
    assert bounded.status_ == "nuisance_at_bound" and "gamma identified" in bounded.reason_
    table = fit_scaling(pl.DataFrame({"run": ["r"] * density.size, "round": range(density.size), "density": density,
                                      "error": error, "metric": "m"}), n_bootstrap=0,
                        classes={"r": 10})
    row = table.row(0, named=True)
    assert row["epsilon_dagger_max"] == pytest.approx(0.9) and row["epsilon_dagger_fixed"] is False
    from flowscan.summary import scaling_text
    text = scaling_text(table)
    if row["status"] == "nuisance_at_bound":   # a measurement: gamma printed, with the reason beside it
        assert "gamma identified; epsilon_dagger" in text and "gamma not identified" not in text


def test_epsilon_np_at_its_bound_is_flagged():
    density = 0.8 ** np.arange(12)
    error = scaling_function(density, **TRUE)
    error[0] = 0.02          # a dense error far below what the curve needs
    fit = CriticalFit(n_bootstrap=0).fit(density, error)
    assert "epsilon_np" in fit.at_bound_ and fit.status_ == "at_bound"


def test_a_relevance_conflict_splits_a_class_even_below_the_threshold():
    # A and B are close in RMS but block l3 is relevant in A and irrelevant in B (tiny SEMs)
    sig = pl.DataFrame({"unit": ["A"] * 3 + ["B"] * 3 + ["C"] * 3, "block": ["l1", "l2", "l3"] * 3,
                        "sigma": [0.50, -0.40, 0.03, 0.50, -0.40, -0.03, 0.49, -0.41, 0.02],
                        "sigma_sem": [0.001] * 9})
    pairs, classes = compare(sig, threshold=1.0)   # a cut that would put everything together
    ab = pairs.filter(a="A", b="B").row(0, named=True)
    assert ab["n_conflicts"] == 1 and ab["rms"] < 1.0
    assert classes["A"] != classes["B"] and classes["A"] == classes["C"]


def test_default_threshold_comes_from_the_sems():
    sig = pl.DataFrame({"unit": ["A"] * 2 + ["B"] * 2 + ["C"] * 2, "block": ["l1", "l2"] * 3,
                        "sigma": [0.30, -0.30, 0.32, -0.29, 0.90, 0.10], "sigma_sem": [0.03] * 6})
    pairs, classes = compare(sig)
    noise = math.sqrt(0.03 ** 2 + 0.03 ** 2)
    assert pairs["noise_rms"].to_list() == pytest.approx([noise] * 3)
    assert pairs["threshold"][0] == pytest.approx(2 * noise)
    assert classes["A"] == classes["B"] != classes["C"]   # A~B within their error bars, C far


def test_dendrogram_table_lists_every_merge():
    from flowscan.stats.compare import tree

    sig = pl.DataFrame({"unit": ["A"] * 2 + ["B"] * 2 + ["C"] * 2, "block": ["l1", "l2"] * 3,
                        "sigma": [0.30, -0.30, 0.32, -0.29, 0.90, 0.10], "sigma_sem": [0.03] * 6})
    pairs, classes = compare(sig)
    t = tree(pairs, list(classes))
    assert t.height == 2 and t["size"].to_list() == [2, 3]
    assert {t["left"][0], t["right"][0]} == {"A", "B"} and "#1" in (t["left"][1], t["right"][1])
    assert t["distance"][0] == pytest.approx(pairs.filter(a="A", b="B")["rms"][0])


def _simulated_experiment(rng, true_sigma, seed_spread, step_noise, n_seeds=3, n_steps=16):
    """Steps of seeds whose own sigma differs from the experiment's by construction."""
    rows = []
    for k in range(n_seeds):
        own = true_sigma + rng.normal(0, seed_spread)
        rows += [(f"e/seed{k}", "b", "M", n, 1.0, own + rng.normal(0, step_noise), True) for n in range(n_steps)]
    steps = _steps(rows)
    eigen = _eigen([(f"e/seed{k}", "b", "M", 0.0, 0.01, 1.0, 0.0) for k in range(n_seeds)])
    runs = pl.DataFrame({"run": [f"e/seed{k}" for k in range(n_seeds)], "status": ["ok"] * n_seeds})
    return aggregate(eigen, runs, steps).row(0, named=True)


def test_the_experiment_error_bar_accounts_for_seeds_that_differ():
    # a block with no flow (sigma = 0) whose seeds differ by 0.05: a verdict other than marginal is a
    # false alarm; the pooled SEM alone raises it in most experiments, the verdict's SEM rarely
    rng = np.random.default_rng(3)
    trials = [_simulated_experiment(rng, 0.0, 0.05, 0.05) for _ in range(400)]
    pooled_alarms = np.mean([abs(t["sigma_mean"]) > 2 * t["sigma_pooled_sem"] for t in trials])
    alarms = np.mean([t["relevance"] != "marginal" for t in trials])
    assert pooled_alarms > 0.4, pooled_alarms
    assert alarms < 0.15, alarms
    # where the seeds agree, nothing is lost: the verdict's SEM is the pooled one, about
    agreeing = [_simulated_experiment(rng, 0.3, 0.0, 0.05) for _ in range(100)]
    assert np.mean([t["relevance"] == "relevant" for t in agreeing]) == 1.0
    assert np.median([t["sigma_sem"] / t["sigma_pooled_sem"] for t in agreeing]) < 1.5


def test_lambda_of_a_step_across_a_gap_counts_per_round():
    # seed0 steps 0->1 and 1->3 (a missing round 2): at a constant rate 1.1 per round the second
    # step grows the share by 1.21, which is 1.1 per round
    steps = _steps([("e/seed0", "b", "M", 0, 1.1, 0.4, True, 1), ("e/seed0", "b", "M", 1, 1.21, 0.4, True, 2),
                    ("e/seed1", "b", "M", 0, 1.1, 0.4, True, 1), ("e/seed1", "b", "M", 1, 1.1, 0.4, True, 1)])
    eigen = _eigen([("e/seed0", "b", "M", 0.4, 0.0, 1.1, 0.4), ("e/seed1", "b", "M", 0.4, 0.0, 1.1, 0.4)])
    runs = pl.DataFrame({"run": ["e/seed0", "e/seed1"], "status": ["ok", "ok"]})
    row = aggregate(eigen, runs, steps).row(0, named=True)
    assert row["lambda_mean"] == pytest.approx(1.1) and row["lambda_sem"] == pytest.approx(0.0, abs=1e-12)


def test_a_block_no_run_prunes_is_never_pruned_in_the_experiment():
    steps = _steps([(f"e/seed{k}", b, "P", n, 1.25 if b == "fc" else 0.9, 1.0 if b == "fc" else -0.4, True)
                    for k in range(2) for b in ("fc", "conv") for n in range(3)])
    eigen = _eigen([(f"e/seed{k}", b, "P", 0.0, 0.0, 1.0, 0.0) for k in range(2) for b in ("fc", "conv")],
                   never=("fc",))
    runs = pl.DataFrame({"run": ["e/seed0", "e/seed1"], "status": ["ok", "ok"]})
    ex = aggregate(eigen, runs, steps)
    assert dict(zip(ex["block"], ex["relevance"])) == {"fc": "never_pruned", "conv": "irrelevant"}
    pairs, _ = compare(sigma_table(ex.with_columns(pl.lit("x").alias("experiment")), "experiment", "P")
                       .vstack(sigma_table(ex, "experiment", "P")))
    assert pairs["n_shared_blocks"].to_list() == [1]   # fc is left out of the sigma vectors


def _eq15_points(seed, rounds, noise):
    rng = np.random.default_rng(seed)
    d = np.tile(0.8 ** np.arange(rounds), 3)   # three seeds, gamma = -0.5 by construction
    return d, scaling_function(d, 0.1, 0.9, -0.5, 0.1) + rng.normal(0, noise, d.size), np.repeat(["a", "b", "c"], rounds)


def test_a_fit_whose_interval_reaches_a_bound_is_not_a_measurement():
    # 17 rounds with noise: the best fit is near -0.5, but resamples run off to the bound -20
    d, e, g = _eq15_points(0, 17, 0.005)
    fit = CriticalFit(n_bootstrap=100, chance_error=0.9).fit(d, e, g)
    assert fit.gamma_ci_[0] == pytest.approx(-20, abs=0.01)
    assert fit.status_ == "interval_at_bound" and "interval_at_bound" not in MEASURED
    assert "reaches its bound -20" in fit.reason_
    # 25 rounds with less noise: the interval stays off the bounds and holds the true gamma
    d, e, g = _eq15_points(0, 25, 0.001)
    fit = CriticalFit(n_bootstrap=100, chance_error=0.9).fit(d, e, g)
    assert fit.status_ in MEASURED and fit.gamma_ci_[0] < -0.5 < fit.gamma_ci_[1] and fit.gamma_ci_[0] > -1


def test_fit_prints_every_fit_with_its_numbers_bound_and_reason():
    from flowscan.summary import scaling_text

    rows = []
    for run, (rounds, noise) in {"bounded": (17, 0.005), "clean": (25, 0.001)}.items():
        d, e, _g = _eq15_points(0, rounds, noise)
        rows.append(pl.DataFrame({"run": [run] * d.size, "round": np.arange(d.size), "density": d, "error": e,
                                  "metric": "m"}))
    table = fit_scaling(pl.concat(rows), Grouping(mapping={r: {"experiment": "E"} for r in ("bounded", "clean")}),
                        n_bootstrap=60, classes={"bounded": 10, "clean": 10})
    text = scaling_text(table)
    by_name = {line.split()[1]: line for line in text.splitlines()[1:] if line.split()[0] in ("run", "experiment")}
    assert set(by_name) == {"bounded", "clean", "E"}
    for name, row in zip(table["name"], table.iter_rows(named=True)):
        line = by_name[name]
        assert row["status"] in line and f"{row['gamma']:+.4f} ± {row['gamma_se']:.4f}" in line
        assert f"{row['epsilon_dagger']:.4f}" in line and " 0.9000 " in line   # eps_dagger and its bound
        assert f"{row['gamma_ci_low']:.3f}" in line and str(row["n_points"]) in line
        assert (row["error"] or "a measurement") in line


def test_aggregate_prints_each_verdict_with_both_error_bars():
    from flowscan.summary import experiments_text

    rng = np.random.default_rng(8)
    row = _simulated_experiment(rng, 0.3, 0.05, 0.05)
    steps = _steps([(f"e/seed{k}", "b", "M", n, 1.0, 0.3 + 0.1 * k + 0.01 * n, True) for k in range(3) for n in range(4)])
    eigen = _eigen([(f"e/seed{k}", "b", "M", 0.0, 0.01, 1.0, 0.0) for k in range(3)])
    runs = pl.DataFrame({"run": [f"e/seed{k}" for k in range(3)], "status": ["ok"] * 3})
    frame = aggregate(eigen, runs, steps)
    row = frame.row(0, named=True)
    line = experiments_text(frame).splitlines()[1]
    assert line.split()[:4] == ["e", "b", "3", "12"] and line.split()[-1] == row["relevance"]
    assert f"{row['sigma_mean']:+.4f} ± {row['sigma_sem']:.4f}" in line
    assert f"{row['sigma_pooled_sem']:.4f}" in line and f"{row['sigma_between_sem']:.4f}" in line
