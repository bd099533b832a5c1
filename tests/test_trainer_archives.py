"""Archives as popular trainers name and write them, read with no flags: PyTorch Lightning's
`epoch=E-step=S.ckpt` (written by Lightning itself), Keras ModelCheckpoint's
`weights.{epoch:02d}-{val_loss:.2f}.h5`, `round_R_epoch_E` names; names whose numbers disagree are
refused by name; and a gap before a round still being written is named as missing."""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl
import pytest

from conftest import FIXTURES, analyze, read_tables, run_cli


@pytest.fixture(scope="module")
def lightning_runs(tmp_path_factory):
    pytest.importorskip("lightning")
    import lightning_archives

    root = tmp_path_factory.mktemp("lightning")
    for permanent in (True, False):
        lightning_archives.write(root / ("permanent" if permanent else "reparametrized"), permanent)
    return root


def _densities(path):
    """Each epoch file's density over the pruned weights, from torch itself."""
    import torch

    out = {}
    for ckpt in sorted(path.glob("epoch=*.ckpt")):
        sd = torch.load(ckpt, weights_only=False)["state_dict"]   # written by this test: trusted
        if "model.0.weight_mask" in sd:
            kept = sum(int(sd[f"model.{k}.weight_mask"].sum()) for k in (0, 2))
        else:
            kept = sum(int((sd[f"model.{k}.weight"] != 0).sum()) for k in (0, 2))
        out[int(ckpt.name.split("-")[0].split("=")[1])] = kept / (32 * 20 + 4 * 32)
    return out


@pytest.mark.parametrize("layout", ["permanent", "reparametrized"])
def test_lightning_epochs_are_the_rounds(lightning_runs, tmp_path, layout):
    run = lightning_runs / layout
    inspected = run_cli("inspect", run).output
    assert "rounds: complete 0-3" in inspected
    assert "the round is the number after 'epoch'; the number after 'step' orders them the same way" in inspected
    assert "ignored (no round number in the name): last.ckpt (Lightning's copy of the latest checkpoint)" in inspected
    assert ("masks: inferred" if layout == "permanent" else "masks: stored") in inspected
    tables = analyze(run, tmp_path / "out")
    density = tables["rounds"].group_by("round").agg(pl.col("global_density").first()).sort("round")
    expected = _densities(run)
    assert density["global_density"].to_list() == pytest.approx([expected[n] for n in range(4)], abs=1e-12)
    assert tables["runs"]["status"].to_list() == ["ok"] and (tables["steps"]["valid"]).all()
    assert sorted(tables["rounds"]["block"].unique().to_list()) == ["model.0", "model.2"]
    if layout == "reparametrized":
        notes = tables["runs"]["notes"][0]
        assert "each weight is X.weight_orig x X.weight_mask" in notes


def test_both_lightning_layouts_give_the_same_flow(lightning_runs, tmp_path):
    a = analyze(lightning_runs / "permanent", tmp_path / "a")["rounds"].drop("run")
    b = analyze(lightning_runs / "reparametrized", tmp_path / "b")["rounds"].drop("run")
    assert a.select("round", "block", "n_unpruned").equals(b.select("round", "block", "n_unpruned"))


def test_keras_checkpoint_names_with_a_loss_in_them(tmp_path):
    run = tmp_path / "keras"
    run.mkdir()
    for k, path in enumerate(sorted((FIXTURES / "keras" / "closed-form-h5").glob("round_*.h5"))):
        shutil.copy(path, run / f"weights.{k + 1:02d}-{0.9 - 0.1 * k:.2f}.h5")
    tables = analyze(run, tmp_path / "out")
    original = analyze(FIXTURES / "keras" / "closed-form-h5", tmp_path / "orig")
    assert tables["rounds"].drop("run").equals(original["rounds"].drop("run"))   # the loss never orders them
    assert "round = number - 1" in tables["runs"]["notes"][0]


def test_round_and_epoch_in_one_name_take_the_round(tmp_path):
    run = tmp_path / "imp"
    run.mkdir()
    epochs = [9, 9, 4, 9, 2]
    for k, path in enumerate(sorted((FIXTURES / "closed-form" / "safetensors").glob("round_*.safetensors"))):
        shutil.copy(path, run / f"round_{k}_epoch_{epochs[k]}.safetensors")
    tables = analyze(run, tmp_path / "out")
    original = analyze(FIXTURES / "closed-form" / "safetensors", tmp_path / "orig")
    assert tables["rounds"].drop("run").equals(original["rounds"].drop("run"))
    assert "the round is the number after 'round'; the number after 'epoch' is ignored" in tables["runs"]["notes"][0]


def test_numbers_that_disagree_are_refused_by_name(tmp_path):
    run = tmp_path / "odd"
    run.mkdir()
    files = sorted((FIXTURES / "closed-form" / "safetensors").glob("round_*.safetensors"))
    for k, path in enumerate(files[:3]):
        shutil.copy(path, run / f"ckpt_{k}_{7 - k}.safetensors")
    analyze(run, tmp_path / "out", expect=1)
    error = read_tables(tmp_path / "out")["runs"]["error"][0]
    assert "carry two numbers that order the files differently" in error and "ckpt_0_7.safetensors" in error


def test_a_gap_before_a_round_being_written_is_missing(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "closed-form" / "flowscan", run)
    shutil.rmtree(run / "round_0002")                 # a middle round deleted ...
    shutil.rmtree(run / "round_0004")
    (run / "round_0003" / "round.json").unlink()      # ... while round 3 is being written (round.json comes last)
    assert "rounds: complete 0-1; missing 2; being written 3" in run_cli("inspect", run).output
    tables = analyze(run, tmp_path / "out")
    row = tables["runs"].row(0, named=True)
    assert row["missing_rounds"] == [2] and row["incomplete_rounds"] == [3] and row["complete_rounds"] == [0, 1]
    assert sorted(tables["rounds"]["round"].unique().to_list()) == [0, 1]
