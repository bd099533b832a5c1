"""Linear mode connectivity, sharpness and the adaptive schedule (CPU, digits)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.numpy import load_file

from conftest import run_cli
from flowscan.train import lmc
from flowscan.landscape.hessian import top_eigenvalue
from flowscan.train.data import Dataset
from flowscan.produce.imp import IMPConfig, adapt_fraction

pytest.importorskip("sklearn")
FAST = ["--model", "mlp", "--data", "digits", "--epochs", "4", "--batch-size", "64", "--lr", "0.05", "-q"]


@pytest.fixture(scope="module")
def produced(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    run_cli("produce", *FAST, "--rounds", "4", "-o", root)
    return root


def test_barrier_is_the_largest_rise_above_the_chord():
    curve = lmc.Curve(np.array([0.0, 0.5, 1.0]), np.array([0.1, 0.3, 0.2]), np.array([1.0, 1.0, 1.0]))
    assert curve.barrier == pytest.approx(0.3 - 0.15)
    assert curve.loss_barrier == pytest.approx(0.0)


def test_batchnorm_is_reestimated_from_training_batches():
    x = torch.randn(100, 3) * 2 + 5
    data = Dataset("t", x, torch.zeros(100, dtype=torch.int64), x, torch.zeros(100, dtype=torch.int64), 2)
    model = nn.Sequential(nn.BatchNorm1d(3))
    lmc.reestimate_batchnorm(model, data, batches=1, batch_size=100, seed=0)
    idx = torch.randint(0, 100, (100,), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model[0].running_mean, x[idx].mean(0))


def test_top_eigenvalue_matches_the_explicit_masked_hessian():
    torch.manual_seed(0)
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    model = nn.Linear(5, 3, bias=False)
    mask = {"weight": torch.rand(3, 5) > 0.3}
    with torch.no_grad():
        model.weight.mul_(mask["weight"])
    top = top_eigenvalue(model, Dataset("t", x, y, x, y, 3), mask, subset=64, tol=1e-9, max_iter=1000)
    w = model.weight.detach().clone().flatten()
    hess = torch.autograd.functional.hessian(lambda f: F.cross_entropy(x @ f.view(3, 5).t(), y), w)
    keep = mask["weight"].flatten()
    assert top.converged
    assert top.value == pytest.approx(float(torch.linalg.eigvalsh(hess[keep][:, keep]).max()), rel=1e-5)


def test_lmc_on_a_produced_run(produced, tmp_path):
    result = run_cli("lmc", produced, "-o", tmp_path, "--points", "5")
    assert "seed_0: rounds 0->1: barrier" in result.output
    curves = pl.read_parquet(tmp_path / "lmc.parquet")
    summary = pl.read_parquet(tmp_path / "lmc_summary.parquet").sort("round")
    assert curves.height == 3 * 5 and summary["round"].to_list() == [0, 1, 2]
    # the ends are the rounds themselves: their errors as the producer measured them while training
    for row in summary.iter_rows(named=True):
        for n, key in ((row["round"], "error_start"), (row["next_round"], "error_end")):
            manifest = json.loads((produced / "seed_0" / f"round_{n:04d}" / "round.json").read_text())
            assert row[key] == pytest.approx(1 - manifest["metrics"]["test_accuracy"], abs=1e-6)   # errors are multiples of 1/360: this pins the counts
    assert summary["density"].to_list() == pytest.approx([0.8, 0.64, 0.512], abs=1e-4)
    dense = summary["dense_error"][0]
    assert summary["next_error"].to_list() == pytest.approx(summary["error_end"].to_list(), abs=1e-12)  # no BN
    assert summary["matching"].to_list() == [e <= dense + 0.01 for e in summary["next_error"]]
    assert (tmp_path / "figures" / "lmc-barrier.png").is_file()


def test_lmc_with_a_user_model_constructor(produced, tmp_path, monkeypatch):
    package = tmp_path / "mymodels"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from flowscan.train.models import MLP\n\ndef digits_mlp():\n    return MLP(64, 10)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    archive = tmp_path / "external"
    shutil.copytree(produced / "seed_0", archive)
    (archive / "flowscan-run.json").unlink()  # no manifest: the model and data must be named
    missing = run_cli("lmc", archive, "-o", tmp_path / "o1", expect=1)
    assert "name the model and data with --model and --data" in missing.output
    run_cli("lmc", archive, "-o", tmp_path / "o2", "--model", "mymodels:digits_mlp", "--data", "digits")
    assert pl.read_parquet(tmp_path / "o2" / "lmc_summary.parquet").height == 3


def test_sharpness_per_round_and_fraction_probe(produced, tmp_path):
    result = run_cli("sharpness", produced, "-o", tmp_path, "--subset", "256", "--probe", "0.2,0.9")
    assert "seed_0: round 0: largest matching fraction" in result.output
    sharp = pl.read_parquet(tmp_path / "sharpness.parquet")
    assert sharp["round"].to_list() == [0, 1, 2, 3]
    assert (sharp["lambda_max"] > 0).all() and sharp["converged"].all()
    probe = pl.read_parquet(tmp_path / "fraction_probe.parquet")
    assert probe.height == 4 * 2 and set(probe["fraction"]) == {0.2, 0.9}
    assert set(probe["run"]) == set(sharp["run"]) == {"seed_0"}   # named as analyze names them


def test_probe_refuses_runs_not_made_by_produce_before_any_work(produced, tmp_path):
    archive = tmp_path / "mixed"
    shutil.copytree(produced / "seed_0", archive / "seed_0")
    shutil.copytree(produced / "seed_0", archive / "seed_1")
    (archive / "seed_1" / "flowscan-run.json").unlink()
    result = run_cli("sharpness", archive, "-o", tmp_path / "o", "--probe", "0.2", "--model", "mlp",
                     "--data", "digits", expect=1)
    assert "not such a run: seed_1" in result.output
    assert not (tmp_path / "o").exists()


def test_adaptive_fraction_rule():
    cfg = IMPConfig(model="mlp", data="digits", rounds=1)
    assert adapt_fraction(cfg, 0.2, matching=True, barrier=0.0) == pytest.approx(0.3)
    assert adapt_fraction(cfg, 0.7, matching=True, barrier=0.0) == pytest.approx(0.8)  # capped
    assert adapt_fraction(cfg, 0.3, matching=True, barrier=0.05) == pytest.approx(0.2)  # barrier rose
    assert adapt_fraction(cfg, 0.3, matching=False, barrier=0.0) == pytest.approx(0.2)
    assert adapt_fraction(cfg, 0.06, matching=False, barrier=0.5) == pytest.approx(0.05)  # floor


def test_adaptive_schedule_records_its_choices_and_resumes(tmp_path):
    args = [*FAST, "--schedule", "adaptive", "--rounds", "8", "--target-density", "0.1"]
    run_cli("produce", *args, "-o", tmp_path / "a")
    run = tmp_path / "a" / "seed_0"
    rounds = sorted(run.glob("round_*"))
    infos = [json.loads((r / "round.json").read_text()) for r in rounds]
    assert infos[-1]["density"] <= 0.1 or len(rounds) == 8
    cfg = IMPConfig(model="mlp", data="digits", rounds=8)
    for before, after in zip(infos[1:], infos[2:]):
        m = before["metrics"]
        assert m["matching"] == 1.0 or m["pruned_fraction"] <= cfg.min_fraction  # kept rounds pass the gate
        expected = adapt_fraction(cfg, m["pruned_fraction"], bool(m["matching"]), m["lmc_barrier"])
        assert before["prune_fraction_next"] == pytest.approx(expected)
        used = after["metrics"]["pruned_fraction"]  # the first attempt, or a retry below it
        assert used == pytest.approx(expected) or used < expected
        assert after["density"] == pytest.approx(before["density"] * (1 - used), abs=2e-4)
        assert after["metrics"]["train_steps"] == after["metrics"]["attempts"] * infos[1]["metrics"]["train_steps"] \
            / infos[1]["metrics"]["attempts"]
    # resume from the middle ends with the same archive
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for r in sorted((tmp_path / "b" / "seed_0").glob("round_*"))[2:]:
        shutil.rmtree(r)
    run_cli("produce", *args, "-o", tmp_path / "b")
    for r in rounds:
        for part in ("weights", "masks"):
            a = load_file(str(r / f"{part}.safetensors"))
            b = load_file(str(tmp_path / "b" / "seed_0" / r.name / f"{part}.safetensors"))
            assert all(np.array_equal(a[k], b[k]) for k in a), (r.name, part)


def test_report_includes_the_landscape_when_computed(produced, tmp_path):
    from conftest import analyze
    from flowscan.report import figure_ids

    out = tmp_path / "out"
    analyze(produced, out)
    run_cli("lmc", produced, "-o", out, "--points", "3")
    run_cli("sharpness", produced, "-o", out, "--subset", "128", "--rounds", "0,2-3")
    run_cli("report", out, "--bootstrap", "0")
    page = (out / "report.html").read_text()
    assert {"lmc-barrier", "sharpness", "lmc-curves-seed-0"} <= set(figure_ids(page))
    assert 'id="table-lmc_summary"' in page and 'id="table-sharpness"' in page
    assert "round n of the segment" in page   # the curves' colour bar
    assert "<code>instability</code> (Frankle et al.)" in page and "ends_differ" in page
    assert "exponential_ok" in page and "lambda_sem" in page and "sigma_pooled_sem" in page
    assert "at the end of each round computed (seed_0: 0, 2-3)" in page   # sharpness on the rounds chosen


def _independent_errors(run, n, alphas, projected=False):
    """Test error along round n -> n+1 of a produce run, computed here with plain torch."""
    from flowscan.train.data import load
    from flowscan.train.models import build

    data = load("digits")
    model = build("mlp", data.input_shape, data.n_classes)[0].eval()
    ends = []
    for k in (n, n + 1):
        folder = run / f"round_{k:04d}"
        weights, masks = load_file(str(folder / "weights.safetensors")), load_file(str(folder / "masks.safetensors"))
        ends.append({name: torch.from_numpy(w * masks[name] if name in masks else w) for name, w in weights.items()})
    end_masks = {k: torch.from_numpy(v.astype(bool)) for k, v in
                 load_file(str(run / f"round_{n + 1:04d}" / "masks.safetensors")).items()}
    errors = []
    for a in alphas:
        state = {k: (1 - a) * ends[0][k] + a * ends[1][k] for k in ends[0]}
        if projected and 0 < a < 1:
            state = {k: v * end_masks[k] if k in end_masks else v for k, v in state.items()}
        with torch.no_grad():
            logits = torch.func.functional_call(model, state, (data.x_test,))
        errors.append(float((logits.argmax(1) != data.y_test).float().mean()))
    return np.array(errors)


def test_linear_path_barrier_matches_an_independent_torch_computation(produced, tmp_path):
    run_cli("lmc", produced, "-o", tmp_path / "lin")
    run_cli("lmc", produced, "-o", tmp_path / "proj", "--path", "projected")
    alphas = np.linspace(0, 1, 11)
    linear = pl.read_parquet(tmp_path / "lin" / "lmc_summary.parquet")
    projected = pl.read_parquet(tmp_path / "proj" / "lmc_summary.parquet")
    for n in (0, 1, 2):
        errors = _independent_errors(produced / "seed_0", n, alphas)
        chord = (1 - alphas) * errors[0] + alphas * errors[-1]
        row = linear.filter(round=n).row(0, named=True)
        assert row["path"] == "linear"
        assert row["barrier"] == pytest.approx(float(np.max(errors - chord)), abs=1e-6)   # errors are multiples of 1/360: this pins the counts
        assert row["instability"] == pytest.approx(float(errors.max() - (errors[0] + errors[-1]) / 2), abs=1e-6)   # errors are multiples of 1/360: this pins the counts
        proj = _independent_errors(produced / "seed_0", n, alphas, projected=True)
        assert projected.filter(round=n)["barrier"][0] == pytest.approx(
            float(np.max(proj - ((1 - alphas) * proj[0] + alphas * proj[-1]))), abs=1e-6)   # errors are multiples of 1/360: this pins the counts
    dense = linear.filter(round=0)["error_start"][0]
    assert (linear["dense_error"] == dense).all() and (linear["tolerance"] == 0.01).all()
    assert linear["matching"].to_list() == [e <= dense + 0.01 for e in linear["error_end"]]


def test_every_command_decides_matching_with_the_runs_own_round_0(tmp_path):
    root = tmp_path / "two"
    run_cli("produce", *FAST, "--rounds", "3", "--seeds", "2", "-o", root)
    run_cli("lmc", root, "-o", tmp_path / "out", "--points", "3")
    run_cli("sharpness", root, "-o", tmp_path / "out", "--subset", "64", "--max-iter", "3", "--probe", "0.5")
    summary = pl.read_parquet(tmp_path / "out" / "lmc_summary.parquet")
    probe = pl.read_parquet(tmp_path / "out" / "fraction_probe.parquet")
    recorded = {}
    for seed in ("seed_0", "seed_1"):
        for n in range(3):
            info = json.loads((root / seed / f"round_{n:04d}" / "round.json").read_text())
            recorded[(seed, n)] = 1 - info["metrics"]["test_accuracy"]
    for row in summary.iter_rows(named=True):   # lmc: round n+1 against its own run's round 0
        dense = recorded[(row["run"], 0)]
        assert row["dense_error"] == pytest.approx(dense, abs=1e-6)
        assert row["next_error"] == pytest.approx(recorded[(row["run"], row["next_round"])], abs=1e-6)
        assert row["matching"] == (recorded[(row["run"], row["next_round"])] <= dense + 0.01)
    for row in probe.iter_rows(named=True):     # the probe: the same dense error, the same rule
        assert row["dense_error"] == pytest.approx(recorded[(row["run"], 0)], abs=1e-6)
        assert row["matching"] == (row["error"] <= row["dense_error"] + 0.01)


def test_adaptive_schedule_decides_on_validation_data(tmp_path):
    run_cli("produce", *FAST, "--rounds", "3", "--schedule", "adaptive", "-o", tmp_path)
    info = [json.loads((r / "round.json").read_text()) for r in sorted((tmp_path / "seed_0").glob("round_*"))]
    dense = info[0]["metrics"]["validation_error"]
    for r in info[1:]:
        m = r["metrics"]
        assert "validation_error" in m
        assert bool(m["matching"]) == (m["validation_error"] <= dense + 0.01) or m["pruned_fraction"] <= 0.05


# -- a study's landscape, narrowed and honest about what it skipped ----------------------------------
def test_round_specs_and_their_refusals():
    from flowscan.errors import FlowscanError
    from flowscan.landscape.selection import RoundSpec

    spec = RoundSpec.parse("0-4,8,12-")
    assert [n for n in range(20) if n in spec] == [0, 1, 2, 3, 4, 8, 12, 13, 14, 15, 16, 17, 18, 19]
    assert [n for n in range(5) if n in RoundSpec.parse("-2")] == [0, 1, 2]
    assert all(n in RoundSpec.parse(None) for n in range(50))
    for bad in ("a", "4-2", "1,,2", "-", "3-4-5"):
        with pytest.raises(FlowscanError, match="--rounds"):
            RoundSpec.parse(bad)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Two seeds of 5 rounds; seed_1 lacks round 2 (a gap), seed_0 has an unfinished round 5."""
    root = tmp_path_factory.mktemp("study")
    run_cli("produce", *FAST, "--rounds", "5", "--seeds", "2", "-o", root)
    shutil.rmtree(root / "seed_1" / "round_0002")
    unfinished = root / "seed_0" / "round_0005"
    shutil.copytree(root / "seed_0" / "round_0004", unfinished)
    (unfinished / "round.json").unlink()   # written last: the round is still being written
    return root


def test_lmc_takes_runs_and_rounds_and_names_what_it_skips(study, tmp_path):
    result = run_cli("lmc", study, "-o", tmp_path, "--points", "3", "--runs", "seed_1", "--rounds", "1-4")
    summary = pl.read_parquet(tmp_path / "lmc_summary.parquet").sort("round")
    assert summary["run"].unique().to_list() == ["seed_1"]
    # round 0 is outside --rounds, yet read for the dense error; the pair across the gap is 1 -> 3
    assert list(zip(summary["round"], summary["next_round"], summary["span"])) == [(1, 3, 2), (3, 4, 1)]
    info = json.loads((study / "seed_1" / "round_0000" / "round.json").read_text())
    assert summary["dense_error"].to_list() == pytest.approx([1 - info["metrics"]["test_accuracy"]] * 2, abs=1e-6)
    assert "rounds 1->3 (spans 2 rounds)" in result.stdout
    assert not [line for line in result.stderr.splitlines() if "barrier " in line]   # results once, on stdout
    assert "seed_1: rounds 1->3: 3 points on the linear path (across 1 missing round(s)" in result.stderr
    whole = run_cli("lmc", study, "-o", tmp_path / "all", "--points", "3")
    assert "seed_0: round 5 is not analysed" in whole.stderr   # the unfinished round is named
    with_all = pl.read_parquet(tmp_path / "all" / "lmc_summary.parquet").filter(run="seed_1").sort("round")
    assert with_all.filter(round=1).select("barrier", "next_error").equals(summary.filter(round=1).select(
        "barrier", "next_error"))   # narrowing changes nothing it keeps
    none = run_cli("lmc", study, "-o", tmp_path / "x", "--runs", "seed_9", expect=1)
    assert "no run matches --runs 'seed_9' (runs: seed_0, seed_1)" in none.output


def test_without_a_round_0_matching_is_unknown_in_lmc_and_the_probe(study, tmp_path):
    root = tmp_path / "late"
    shutil.copytree(study / "seed_1", root / "seed_1")
    shutil.rmtree(root / "seed_1" / "round_0000")
    result = run_cli("lmc", root, "-o", tmp_path / "out", "--points", "3")
    summary = pl.read_parquet(tmp_path / "out" / "lmc_summary.parquet")
    assert summary.height and summary["dense_error"].is_nan().all() and summary["matching"].is_null().all()
    assert "has no round 0" in result.stderr
    run_cli("sharpness", root, "-o", tmp_path / "out", "--subset", "32", "--max-iter", "2", "--probe", "0.5",
            "--rounds", "3")
    probe = pl.read_parquet(tmp_path / "out" / "fraction_probe.parquet")
    assert probe["round"].to_list() == [3]   # --rounds reaches the probe too
    assert probe["dense_error"].is_nan().all() and probe["matching"].is_null().all()


def test_the_path_gives_the_errors_of_one_model_at_a_time_and_reuses_stored_ends(produced, monkeypatch):
    from flowscan.train.data import load

    data = load("digits")
    rounds = sorted((produced / "seed_0").glob("round_*"))
    torch.manual_seed(0)
    from flowscan.train.models import build

    model = build("mlp", data.input_shape, data.n_classes)[0]
    start = {k: torch.from_numpy(v) for k, v in load_file(str(rounds[0] / "weights.safetensors")).items()}
    end = {k: torch.from_numpy(v) for k, v in load_file(str(rounds[1] / "weights.safetensors")).items()}
    alphas = np.linspace(0, 1, 7)
    curve = lmc.interpolate(model, start, end, {}, data, alphas)
    for alpha, error, loss in zip(alphas, curve.errors, curve.losses):
        model.load_state_dict(lmc.point_state(start, end, alpha, {}))
        assert (error, loss) == lmc.evaluate(model, data)   # identical, not close
    calls = []
    original = lmc.evaluate
    monkeypatch.setattr(lmc, "evaluate", lambda *a, **k: calls.append(1) or original(*a, **k))
    again = lmc.interpolate(model, start, end, {}, data, alphas, ends=((0.5, 9.0), (0.25, 8.0)))
    assert len(calls) == len(alphas) - 2   # the stored ends are not evaluated again (no BatchNorm)
    assert (again.errors[0], again.errors[-1]) == (0.5, 0.25) and np.array_equal(again.errors[1:-1], curve.errors[1:-1])


def test_batchnorm_path_ends_are_recorded_beside_the_stored_networks(tmp_path):
    root = tmp_path / "bn"
    run_cli("produce", "--model", "cifar-resnet14", "--data", "synthetic-images:3x8x8:200", "--rounds", "2",
            "--epochs", "1", "--batch-size", "50", "-q", "-o", root)
    result = run_cli("lmc", root, "-o", tmp_path / "out", "--points", "3", "--bn-batches", "1", "--tolerance", "0",
                     "-q")
    row = pl.read_parquet(tmp_path / "out" / "lmc_summary.parquet").row(0, named=True)
    info = [json.loads((root / "seed_0" / f"round_{n:04d}" / "round.json").read_text()) for n in (0, 1)]
    # the stored networks' errors are the producer's; the path's ends carry re-estimated statistics
    assert row["stored_error_start"] == pytest.approx(1 - info[0]["metrics"]["test_accuracy"], abs=1e-6)
    assert row["next_error"] == pytest.approx(1 - info[1]["metrics"]["test_accuracy"], abs=1e-6)
    differ = row["error_start"] != row["stored_error_start"] or row["error_end"] != row["next_error"]
    assert row["ends_differ"] == differ
    assert ("warning: seed_0: rounds 0->1: the path's ends" in result.output) == differ   # warned even with -q
    chord = max(0.0, row["barrier"])
    assert row["barrier"] == pytest.approx(chord) and row["instability"] >= row["barrier"] - 1e-12
