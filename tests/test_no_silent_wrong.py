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
    assert "error: run ." in result.output


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
    assert "warning: run .: block rule 'resnet-stages' matches no prunable tensor" in result.output
    assert "100% of the prunable parameters match no block rule" in result.output
    notes = read_tables(tmp_path / "out")["runs"]["notes"][0]
    assert "matches no prunable tensor" in notes and "(other)" in notes


def test_good_rules_give_no_warning(tmp_path):
    result = run_cli("analyze", FIXTURES / "closed-form" / "safetensors", "-o", tmp_path / "out", "-q",
                     "--blocks", r"^(a|b)\.")
    assert "warning" not in result.output
