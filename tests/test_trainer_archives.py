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
    cols = ["round", "block", "n_unpruned"]
    assert a.select(cols).sort(cols[:2]).equals(b.select(cols).sort(cols[:2]))


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


# -- rahulvigneswaran/Lottery-Ticket-Hypothesis-in-Pytorch: pickled modules, masks dumped apart ------
def _lottery_pytorch_run(root, rounds=3, dumped=3):
    """Written as that code writes it: torch.save(model) per round, pickle.dump(list of numpy masks)
    after the round's training, named by the density (% of all parameters, biases included)."""
    import pickle

    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    saves, dumps = root / "saves" / "fc1" / "mnist", root / "dumps" / "lt" / "fc1" / "mnist"
    saves.mkdir(parents=True)
    dumps.mkdir(parents=True)
    masks = [np.ones(tuple(p.shape), np.float64) for n, p in model.named_parameters() if "weight" in n]
    expected = []
    for k in range(rounds):
        if k:   # prune 30 % of each weight's survivors by magnitude, as prune_by_percentile does
            step = 0
            for name, p in model.named_parameters():
                if "weight" in name:
                    t = p.data.numpy()
                    cut = np.percentile(np.abs(t[np.nonzero(t)]), 30)
                    masks[step] = np.where(np.abs(t) < cut, 0, masks[step])
                    p.data = torch.from_numpy(t * masks[step]).float()
                    step += 1
        with torch.no_grad():   # "training": survivors move; one kept weight lands exactly on zero
            weights = [p for n, p in model.named_parameters() if "weight" in n]
            for p, m in zip(weights, masks):
                p.mul_(torch.from_numpy(m.astype(np.float32)) * 1.1)
            if masks[0][0, 0]:
                model[0].weight[0, 0] = 0.0
        torch.save(model, saves / f"{k}_model_lt.pth.tar")
        total = sum(p.numel() for p in model.parameters())
        comp = round(sum(int((p != 0).sum()) for p in model.parameters()) / total * 100, 1)
        if k < dumped:
            with open(dumps / f"lt_mask_{comp}.pkl", "wb") as fp:
                pickle.dump([m.copy() for m in masks], fp)
        expected.append(sum(int(m.sum()) for m in masks))
    return saves, expected


def test_stored_mask_dumps_are_read_not_inferred(tmp_path):
    saves, expected = _lottery_pytorch_run(tmp_path / "repo")
    result = run_cli("analyze", tmp_path / "repo", "-o", tmp_path / "out")
    tables = read_tables(tmp_path / "out")
    runs = tables["runs"].row(0, named=True)
    assert runs["mask_source"] == "stored" and "masks read from" in runs["notes"] and "lt_mask_" in runs["notes"]
    kept = tables["rounds"].group_by("round").agg(pl.col("n_unpruned").sum()).sort("round")["n_unpruned"].to_list()
    assert kept == expected   # the kept weight that is exactly zero counts as kept: the dumps, not the zeros
    assert "Traceback" not in result.output


def test_a_round_whose_mask_is_not_dumped_yet_is_still_training(tmp_path):
    saves, expected = _lottery_pytorch_run(tmp_path / "repo", rounds=3, dumped=2)
    tables = analyze(tmp_path / "repo", tmp_path / "out")
    row = tables["runs"].row(0, named=True)
    assert row["complete_rounds"] == [0, 1] and row["incomplete_rounds"] == [2]
    alone = tmp_path / "only-saves"   # without the dumps the zeros are the masks, said so
    shutil.copytree(saves.parent.parent, alone / "saves")
    notes = analyze(alone, tmp_path / "out2")["runs"]["notes"][0]
    assert "no mask dumps in" in notes and "inferred from the weights' zeros" in notes
