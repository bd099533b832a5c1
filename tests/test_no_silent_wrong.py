"""Paths that once gave a wrong result with exit code 0 now give the right one or say why."""

from __future__ import annotations

import shutil

import polars as pl
import pytest

from conftest import FIXTURES, analyze, read_tables, run_cli


def test_safetensors_seed_folders_are_runs_not_rounds(tmp_path):
    seeds = tmp_path / "seeds"
    for seed in ("seed_0", "seed_1"):
        shutil.copytree(FIXTURES / "closed-form" / "safetensors", seeds / seed)
    tables = analyze(seeds, tmp_path / "out")
    runs = tables["runs"]
    assert runs["run"].to_list() == ["seed_0", "seed_1"]
    assert runs["n_rounds"].to_list() == [5, 5]
    alone = analyze(FIXTURES / "closed-form" / "safetensors", tmp_path / "alone")
    for seed in ("seed_0", "seed_1"):
        got = tables["eigen"].filter(pl.col("run") == seed).drop("run")
        assert got.equals(alone["eigen"].drop("run"))


@pytest.mark.parametrize("fixture, original, duplicate", [
    ("closed-form/safetensors", "round_2.safetensors", "round_02.safetensors"),
    ("closed-form/prune-style", "2checkpoint.pth.tar", "02checkpoint.pth.tar"),
    ("closed-form/flowscan", "round_0002", "round_02"),
    ("bert-tickets/mrpc", "checkpoint-1000", "checkpoint-01000"),
])
def test_two_files_for_one_round_are_an_error_naming_both(tmp_path, fixture, original, duplicate):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / fixture, run)
    source = run / original
    (shutil.copytree if source.is_dir() else shutil.copy)(source, run / duplicate)
    result = run_cli("analyze", run, "-o", tmp_path / "out", "-q", expect=1)
    error = read_tables(tmp_path / "out")["runs"]["error"][0]
    assert original in error and duplicate in error and "which one is meant" in error, error
    assert "error: run run:" in result.output


def test_open_lth_duplicate_levels_are_an_error(tmp_path):
    run = tmp_path / "lottery"
    shutil.copytree(FIXTURES / "open_lth", run)
    replicate = next(p for p in run.rglob("replicate_*") if p.is_dir())
    shutil.copytree(replicate / "level_1", replicate / "level_01")
    run_cli("analyze", run, "-o", tmp_path / "out", "-q", expect=1)
    errors = read_tables(tmp_path / "out")["runs"].filter(pl.col("status") == "error")["error"].to_list()
    assert any("level_1" in e and "level_01" in e for e in errors), errors


def test_a_tensor_in_two_files_of_one_round_is_an_error(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "hf-sharded", run)
    shards = sorted((run / "step_1").glob("model-*.safetensors"))
    shutil.copy(shards[0], run / "step_1" / "extra.safetensors")
    index = run / "step_1" / "model.safetensors.index.json"
    import json
    data = json.loads(index.read_text())
    data["weight_map"]["zz.extra"] = "extra.safetensors"
    index.write_text(json.dumps(data))
    run_cli("analyze", run, "-o", tmp_path / "out", "-q", expect=1)
    error = read_tables(tmp_path / "out")["runs"]["error"][0]
    assert "is also in" in error and "which one is meant" in error


def test_a_misspelt_preset_is_an_error_with_a_suggestion(tmp_path):
    result = run_cli("analyze", FIXTURES / "closed-form", "-o", tmp_path / "out", "--blocks", "resnet-stagez",
                     expect=2)
    assert "no such preset; did you mean 'resnet-stages'?" in result.output
    assert not (tmp_path / "out").exists()


def test_rules_that_match_nothing_are_warned_about_and_noted(tmp_path):
    result = run_cli("analyze", FIXTURES / "closed-form" / "safetensors", "-o", tmp_path / "out", "-q",
                     "--blocks", "resnet-stages")
    assert "warning: run safetensors: block rule 'resnet-stages' matches no prunable tensor" in result.output
    assert "100% of the prunable parameters match no block rule" in result.output
    notes = read_tables(tmp_path / "out")["runs"]["notes"][0]
    assert "matches no prunable tensor" in notes and "(other)" in notes


def test_good_rules_give_no_warning(tmp_path):
    result = run_cli("analyze", FIXTURES / "closed-form" / "safetensors", "-o", tmp_path / "out", "-q",
                     "--blocks", r"^(a|b)\.")
    assert "warning" not in result.output


def _landscape_table(out, source):
    from flowscan import tables

    frame = pl.DataFrame({"run": ["."], "round": [0], "barrier": [0.5]})
    tables.write_tables({"lmc_summary": frame}, out, tables.metadata("test", "", source=str(source.resolve())))


def test_analysis_of_another_archive_sets_the_old_derived_tables_aside(tmp_path):
    a, b, out = FIXTURES / "closed-form" / "safetensors", FIXTURES / "torch-prune", tmp_path / "out"
    analyze(a, out)
    run_cli("aggregate", out)
    _landscape_table(out, a)
    assert (out / "experiments.parquet").is_file() and (out / "lmc_summary.parquet").is_file()
    run_cli("analyze", a, "-o", out, "-q")                  # the same analysis again: all kept
    assert (out / "experiments.parquet").is_file() and (out / "lmc_summary.parquet").is_file()

    result = run_cli("analyze", b, "-o", out, "-q")
    assert "warning: moved experiments.parquet, experiment_runs.parquet, lmc_summary.parquet" in result.output
    assert not (out / "experiments.parquet").exists() and not (out / "lmc_summary.parquet").exists()
    aside = [p for p in out.iterdir() if p.name.startswith("stale-")]
    assert len(aside) == 1 and (aside[0] / "lmc_summary.parquet").is_file()
    assert read_tables(out)["runs"]["run"].to_list() == ["seed0"]


def test_other_options_make_stats_tables_stale_but_keep_the_archive_tables(tmp_path):
    a, out = FIXTURES / "closed-form" / "safetensors", tmp_path / "out"
    analyze(a, out)
    run_cli("aggregate", out)
    _landscape_table(out, a)
    run_cli("analyze", a, "-o", out, "-q", "--blocks", r"^(a|b)\.")
    assert not (out / "experiments.parquet").exists()      # derived from the old blocks
    assert (out / "lmc_summary.parquet").is_file()         # computed from the same archive


def test_readers_of_derived_tables_ignore_a_stale_one_and_say_so(tmp_path):
    out = tmp_path / "out"
    analyze(FIXTURES / "closed-form" / "safetensors", out)
    _landscape_table(out, FIXTURES / "torch-prune")         # e.g. `lmc OTHER -o out`
    result = run_cli("report", out)
    assert "warning:" in result.output and "lmc_summary.parquet: from another analysis" in result.output
    from flowscan.stats.loading import load_analysis
    assert "lmc_summary" not in load_analysis(out).landscape


def test_experiments_are_named_after_the_archive_not_dot(tmp_path):
    seeds = tmp_path / "mnist-lenet"
    for seed in ("seed_0", "seed_1"):
        shutil.copytree(FIXTURES / "closed-form" / "safetensors", seeds / seed)
    out = tmp_path / "out"
    analyze(seeds, out)
    result = run_cli("aggregate", out)
    experiments = pl.read_parquet(out / "experiments.parquet")
    assert experiments["experiment"].unique().to_list() == ["mnist-lenet"]
    lines = result.output.splitlines()
    assert lines[0].split()[0] == "experiment" and lines[1].split()[0] == "mnist-lenet"
    single = tmp_path / "single"
    analyze(FIXTURES / "closed-form" / "safetensors", single)
    run_cli("aggregate", single)
    assert pl.read_parquet(single / "experiments.parquet")["experiment"].unique().to_list() == ["safetensors"]
