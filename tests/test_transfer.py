"""Ticket transfer: starting points from other archives, the baseline masks, the transfer
command's arms, tables and resume. Small MLPs on digits (CPU, seconds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.numpy import load_file

from conftest import run_cli
from flowscan.errors import FlowscanError
from flowscan.produce import sources, tickets
from flowscan.produce.transfer import CELLS, default_rounds
from flowscan.stats import transfer as stats

pytest.importorskip("sklearn")
RECIPE = ["--epochs", "2", "--batch-size", "64", "--lr", "0.05"]
FAST = ["--model", "mlp", "--data", "digits", *RECIPE, "-q"]


def _round(run: Path, index: int) -> tuple[dict, dict, dict]:
    folder = run / f"round_{index:04d}"
    return (load_file(str(folder / "weights.safetensors")), load_file(str(folder / "masks.safetensors")),
            json.loads((folder / "round.json").read_text()))


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """Two seeds of four IMP rounds on digits."""
    out = tmp_path_factory.mktemp("source") / "digits-imp"
    run_cli("produce", *FAST, "--rounds", "4", "--seeds", "2", "-o", out)
    return out


def _as_prune_style(run: Path, dest: Path) -> Path:
    """The same rounds as torch.nn.utils.prune state dicts (Chen et al.'s layout)."""
    dest.mkdir(parents=True)
    for folder in sorted(run.glob("round_*")):
        weights, masks, _ = _round(run, int(folder.name.split("_")[1]))
        state = {}
        for name, value in weights.items():
            if name in masks:
                base = name[: -len(".weight")]
                state[f"{base}.weight_orig"] = torch.from_numpy(value)
                state[f"{base}.weight_mask"] = torch.from_numpy(masks[name].astype(np.float32))
            else:
                state[name] = torch.from_numpy(value)
        torch.save({"state_dict": state}, dest / f"{int(folder.name.split('_')[1])}checkpoint.pth.tar")
    return dest


# -- --mask-from / --init-from ----------------------------------------------------------------

def test_mask_from_reproduces_the_ticket_from_either_layout(archive, tmp_path):
    """Round 0 of a run started from round 2's mask, with the same seed and recipe, is round 2:
    the same mask, density and accuracy, whether the mask is read from produce's layout or from
    prune-style state dicts."""
    prune_style = _as_prune_style(archive / "seed_0", tmp_path / "chen-style")
    weights2, masks2, info2 = _round(archive / "seed_0", 2)
    for name, source in (("flowscan", f"{archive}:2"), ("prune", f"{prune_style}:2")):
        out = tmp_path / name
        run_cli("produce", *FAST, "--rounds", "1", "--mask-from", source, "-o", out)
        weights, masks, info = _round(out / "seed_0", 0)
        assert set(masks) == set(masks2)
        for k in masks2:
            np.testing.assert_array_equal(masks[k], masks2[k])
        assert info["density"] == info2["density"]
        assert info["metrics"]["test_accuracy"] == info2["metrics"]["test_accuracy"]
        assert "mask of" in " ".join(info["start"])


def test_init_from_takes_the_other_archives_rewind_point(archive, tmp_path):
    out = tmp_path / "init"
    run_cli("produce", *FAST, "--rounds", "1", "--first-seed", "5", "--init-from", str(archive / "seed_1"),
            "-o", out)
    rewind = load_file(str(out / "seed_5" / "rewind.safetensors"))
    theirs = load_file(str(archive / "seed_1" / "rewind.safetensors"))
    for k in theirs:
        np.testing.assert_array_equal(rewind[k], theirs[k])
    # seed 5 from seed 1's initialization trains differently from seed 1 (another data order)...
    acc = _round(out / "seed_5", 0)[2]["metrics"]["test_accuracy"]
    assert 0.5 < acc <= 1.0


def test_mask_from_continues_imp_and_resumes(archive, tmp_path):
    out = tmp_path / "more"
    run_cli("produce", *FAST, "--rounds", "3", "--mask-from", f"{archive}:1", "-o", out)
    densities = [_round(out / "seed_0", i)[2]["density"] for i in range(3)]
    assert densities == pytest.approx([0.8, 0.64, 0.512], abs=1e-3)
    # the same command again: nothing to do; other arguments: refused
    again = run_cli("produce", *FAST, "--rounds", "3", "--mask-from", f"{archive}:1", "-o", out)
    assert "round" not in again.output
    result = run_cli("produce", *FAST, "--rounds", "3", "--mask-from", f"{archive}:2", "-o", out, expect=1)
    assert "mask_from" in result.output


def test_masks_that_do_not_fit_are_listed_in_one_error(archive, tmp_path):
    result = run_cli("produce", "--model", "cifar-resnet14", "--data", "digits", *RECIPE, "--rounds", "1",
                     "--mask-from", f"{archive}:2", "-o", tmp_path / "x", expect=1)
    assert "do not fit the model" in result.output
    assert "missing in the source" in result.output and "--fill-unmatched" in result.output


def _tensors(weights: dict, masks: dict) -> sources.RoundTensors:
    return sources.RoundTensors(weights, masks)


def test_fit_masks_classes_of_difference():
    shapes = {"a.weight": (2, 3), "b.weight": (4, 2), "c.weight": (3, 3)}
    src = _tensors({"a.weight": np.ones((2, 3)), "b.weight": np.ones((4, 2)), "c.weight": np.ones((3, 5)),
                    "d.weight": np.ones(2)},
                   {"a.weight": np.array([[1, 0, 1], [0, 0, 1]], bool), "c.weight": np.eye(3, 5, dtype=bool),
                    "d.weight": np.array([True, False])})
    with pytest.raises(FlowscanError) as err:
        sources.fit_masks(src, shapes, "S")
    text = str(err.value)
    assert "c.weight [3, 5] vs [3, 3]" in text and "not prunable here: d.weight" in text
    fitted = sources.fit_masks(src, shapes, "S", fill_unmatched=True, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(fitted.masks["a.weight"], src.masks["a.weight"])
    assert fitted.masks["b.weight"].all()                 # stored without a mask: dense, as in the source
    assert fitted.masks["c.weight"].sum() == 2            # the source tensor's density 3/15 of 9 weights: 1.8
    assert fitted.filled == ["c.weight"]
    assert any("no mask stored for b.weight" in n for n in fitted.notes)


def test_fit_masks_filled_tensor_keeps_the_source_density():
    src = _tensors({"w": np.ones((10, 10))}, {"w": np.arange(100).reshape(10, 10) < 30})
    fitted = sources.fit_masks(src, {"w": (10, 20)}, "S", fill_unmatched=True)
    assert fitted.masks["w"].sum() == 60 and fitted.masks["w"].shape == (10, 20)


def test_archive_ref_parsing():
    assert sources.ArchiveRef.parse("runs/a:3") == sources.ArchiveRef(Path("runs/a"), 3)
    assert sources.ArchiveRef.parse("runs/a:last").round == "last"
    assert sources.ArchiveRef.parse("C:/data/run") == sources.ArchiveRef(Path("C:/data/run"))
    assert sources.ArchiveRef.parse("runs/a") == sources.ArchiveRef(Path("runs/a"))


def test_non_binary_source_mask_is_an_error(archive, tmp_path):
    bad = tmp_path / "bad"
    _as_prune_style(archive / "seed_0", bad)
    path = bad / "2checkpoint.pth.tar"
    state = torch.load(path, weights_only=True)
    name = next(k for k in state["state_dict"] if k.endswith("weight_mask"))
    state["state_dict"][name] = state["state_dict"][name] * 0.5
    torch.save(state, path)
    result = run_cli("produce", *FAST, "--rounds", "1", "--mask-from", f"{bad}:2", "-o", tmp_path / "o", expect=1)
    assert "2checkpoint.pth.tar" in result.output and "0 and 1" in result.output


# -- baseline masks -------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_random_masks_have_exactly_the_requested_counts(seed):
    rng = np.random.default_rng(seed)
    shapes = {"conv": (8, 3, 3, 3), "fc": (10, 64), "vec": (5,)}
    ticket = {n: rng.random(s) < p for (n, s), p in zip(shapes.items(), (0.1, 0.5, 0.9))}
    n_kept = tickets.kept(ticket)
    g = tickets.random_global(shapes, n_kept, rng)
    assert tickets.kept(g) == n_kept and {k: v.shape for k, v in g.items()} == shapes
    layer = tickets.random_per_tensor(ticket, rng)
    shuffled = tickets.shuffled_per_unit(ticket, rng)
    for name in shapes:
        assert layer[name].sum() == ticket[name].sum()
        assert shuffled[name].sum() == ticket[name].sum()
        rows = lambda m: np.asarray(m).reshape(m.shape[0], -1).sum(1)  # noqa: E731
        np.testing.assert_array_equal(rows(shuffled[name]), rows(ticket[name]))
    # the draws are random positions: not the ticket itself (vanishingly unlikely otherwise)
    assert not np.array_equal(layer["fc"], ticket["fc"])


def test_random_global_is_uniform_over_all_weights():
    """Expected share per tensor = its share of the weights (a count over many draws)."""
    rng = np.random.default_rng(0)
    shapes = {"small": (10,), "large": (90,)}
    counts = sum(tickets.random_global(shapes, 20, rng)["small"].sum() for _ in range(2000))
    assert counts / 2000 == pytest.approx(2.0, rel=0.05)


def test_overlap_against_chance_by_hand():
    a = {"x": np.array([1, 1, 0, 0], bool), "y": np.array([1, 0, 0, 0, 0, 0], bool)}
    b = {"x": np.array([1, 0, 1, 0], bool), "y": np.array([1, 1, 1, 0, 0, 0], bool)}
    o = tickets.overlap(a, b)
    assert o["both"] == 2 and o["overlap"] == pytest.approx(2 / 3)
    # chance: x 2*2/4 = 1, y 1*3/6 = 0.5 -> 1.5 of 3 kept
    assert o["chance"] == pytest.approx(0.5)
    assert o["jaccard"] == pytest.approx(2 / (3 + 5 - 2))


def test_default_rounds():
    assert default_rounds(9) == (3, 6, 9)
    assert default_rounds(2) == (1, 2)
    assert default_rounds(1) == (1,)
    assert default_rounds(0) == ()


# -- the transfer command -------------------------------------------------------------------------

def _cells(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / CELLS).rglob("round_*.json"))]


def test_transfer_to_itself_reproduces_the_own_ticket(archive, tmp_path):
    """Source = target archive, same seeds: the transferred ticket is the target's own, so both
    arms train identically and match the accuracy the archive recorded for that round."""
    out = tmp_path / "out"
    result = run_cli("transfer", str(archive), str(archive), "--rounds", "1,3", "-o", out)
    frame = pl.read_parquet(out / "transfer.parquet")
    assert frame.height == 2 * 2 * 5   # seeds x rounds x arms
    for (seed, rnd), part in frame.group_by("seed", "source_round"):
        acc = dict(zip(part["arm"], part["accuracy"]))
        recorded = _round(archive / f"seed_{seed}", rnd)[2]["metrics"]["test_accuracy"]
        assert acc["transferred"] == acc["own"] == acc["transferred_source_init"] == recorded
        own = part.filter(pl.col("arm") == "own")
        assert own["recorded_accuracy"][0] == recorded and own["own_round"][0] == rnd
    density = {r: _round(archive / "seed_0", r)[2]["density"] for r in (1, 3)}
    for row in frame.iter_rows(named=True):   # every arm at exactly the ticket's density
        assert row["density"] == pytest.approx(density[row["source_round"]], abs=1e-12)
    overlap = pl.read_parquet(out / "transfer_overlap.parquet")
    assert (overlap["overlap"] == 1.0).all() and (overlap["chance"] < 1).all()
    pairs = pl.read_parquet(out / "transfer_pairs.parquet")
    assert pairs["sigma_rms"][0] == 0.0 and pairs["n_conflicts"][0] == 0 and pairs["same_archive"][0]
    assert "0 pair(s) of two archives" in result.output
    for name in ("transfer-digits-imp-to-digits-imp", "transfer-sigma-gap"):
        assert (out / "figures" / f"{name}.png").is_file()


def test_summary_gap_is_paired_by_seed(archive, tmp_path):
    out = tmp_path / "out"
    run_cli("transfer", str(archive), str(archive), "--rounds", "2", "-o", out,
            "--arms", "transferred,random_layer,random_global")
    cells = pl.read_parquet(out / "transfer.parquet")
    summ = pl.read_parquet(out / "transfer_summary.parquet")
    wide = {arm: cells.filter(pl.col("arm") == arm).sort("seed")["accuracy"].to_numpy()
            for arm in ("transferred", "random_layer", "random_global")}
    diff = wide["transferred"] - wide["random_layer"]
    row = summ.filter(pl.col("arm") == "transferred").row(0, named=True)
    assert row["gap_mean"] == pytest.approx(diff.mean())
    assert row["gap_sem"] == pytest.approx(diff.std(ddof=1) / math.sqrt(2))
    assert row["accuracy_sem"] == pytest.approx(wide["transferred"].std(ddof=1) / math.sqrt(2))


def test_transfer_to_a_dataset_makes_the_target_tickets_and_resumes(archive, tmp_path, monkeypatch):
    """TARGET as a dataset: its tickets are made by IMP under OUT; an interrupted transfer
    trains only the missing cells and ends with the same tables."""
    out = tmp_path / "out"
    args = ["transfer", str(archive), "digits", "--rounds", "2", "--seeds", "1", "-o", out,
            "--arms", "transferred,own,random_layer,shuffled"]
    first = run_cli(*args)
    target = out / "transfer-targets" / "mlp-digits" / "seed_0"
    assert sorted(p.name for p in target.glob("round_*")) == ["round_0000", "round_0001", "round_0002"]
    full = pl.read_parquet(out / "transfer.parquet").drop("train_seconds")
    assert set(full["arm"]) == {"transferred", "own", "random_layer", "shuffled"}
    # same recipe, same seed: the target made here is the source itself
    assert full.filter(pl.col("arm") == "transferred")["accuracy"][0] == \
        full.filter(pl.col("arm") == "own")["accuracy"][0]
    shuffled = next(p for p in (out / CELLS).rglob("round_*.json") if "shuffled" in str(p))
    shuffled.unlink()
    trained = []
    from flowscan.produce import imp

    original = imp.Session.train_round
    monkeypatch.setattr(imp.Session, "train_round",
                        lambda self, *a, **k: (trained.append(1), original(self, *a, **k))[1])
    run_cli(*args)
    assert len(trained) == 1   # only the missing cell
    again = pl.read_parquet(out / "transfer.parquet").drop("train_seconds")
    assert again.equals(full)
    assert "shuffled" in first.output


def test_interrupted_transfer_finishes_as_an_uninterrupted_one(archive, tmp_path, monkeypatch):
    args = ["--rounds", "1,2", "--arms", "transferred,random_global", "--seeds", "1"]
    run_cli("transfer", str(archive), str(archive), *args, "-o", tmp_path / "whole")
    from flowscan.produce import imp

    original, calls = imp.Session.train_round, []

    def dies_on_third(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, *a, **k)
    monkeypatch.setattr(imp.Session, "train_round", dies_on_third)
    result = run_cli("transfer", str(archive), str(archive), *args, "-o", tmp_path / "cut", expect=130)
    assert "resume" in result.output or "again" in result.output
    monkeypatch.setattr(imp.Session, "train_round", original)
    run_cli("transfer", str(archive), str(archive), *args, "-o", tmp_path / "cut")
    whole = pl.read_parquet(tmp_path / "whole" / "transfer.parquet").drop("train_seconds")
    cut = pl.read_parquet(tmp_path / "cut" / "transfer.parquet").drop("train_seconds")
    assert cut.equals(whole)


def test_transfer_refuses_mixed_settings_and_recipe_overrides_on_archives(archive, tmp_path):
    out = tmp_path / "out"
    run_cli("transfer", str(archive), str(archive), "--rounds", "1", "--seeds", "1", "--arms", "transferred",
            "-o", out)
    result = run_cli("transfer", str(archive), str(archive), "--rounds", "1", "--seeds", "1", "--arms",
                     "transferred", "--fill-unmatched", "-o", out, expect=1)
    assert "other settings" in result.output and "fill_unmatched" in result.output
    result = run_cli("transfer", str(archive), str(archive), "--epochs", "5", "-o", tmp_path / "o2", expect=1)
    assert "its own `produce` manifest gives the recipe" in result.output
    result = run_cli("transfer", str(archive), str(archive), "--rounds", "7", "-o", tmp_path / "o3", expect=1)
    assert "no round 7" in result.output
    result = run_cli("transfer", str(archive), str(archive), "--arms", "bogus", "-o", tmp_path / "o4", expect=1)
    assert "unknown arm 'bogus'" in result.output


def test_transfer_from_another_layout_needs_a_model_for_a_dataset_target(archive, tmp_path):
    chen = _as_prune_style(archive / "seed_0", tmp_path / "chen")
    result = run_cli("transfer", str(chen), "digits", "-o", tmp_path / "o", expect=1)
    assert "--model" in result.output
    out = tmp_path / "o2"
    run_cli("transfer", str(chen), "digits", "--model", "mlp", *RECIPE, "--rounds", "2", "--seeds", "1",
            "--arms", "transferred,transferred_source_init", "-o", out)
    frame = pl.read_parquet(out / "transfer.parquet")
    # a prune-style archive keeps no rewind point: that arm is skipped, the other trained
    assert frame["arm"].to_list() == ["transferred"]


# -- the tables' statistics ----------------------------------------------------------------------

def _pairs(distances, gaps) -> pl.DataFrame:
    rows = [{"source": f"s{i}", "target": f"t{i}", "n_rounds": 1, "n_seeds": 3, "gap_mean": g, "gap_sem": 0.01,
             "own_gap_mean": 0.0, "sigma_rms": d, "n_shared_blocks": 3, "n_conflicts": 0, "conflict_blocks": None,
             "overlap_mean": 0.5, "chance_mean": 0.4, "same_archive": False}
            for i, (d, g) in enumerate(zip(distances, gaps))]
    return pl.DataFrame(rows, schema=stats.PAIRS_SCHEMA)


def test_correlation_is_spearman_and_needs_four_pairs():
    from scipy.stats import spearmanr

    few = stats.correlation(_pairs([0.1, 0.2, 0.3], [0.3, 0.2, 0.1]))
    assert math.isnan(few["spearman_rho"][0]) and "at least 4" in few["statement"][0]
    distances, gaps = [0.05, 0.1, 0.2, 0.4, 0.3], [0.10, 0.08, 0.03, -0.02, 0.01]
    row = stats.correlation(_pairs(distances, gaps)).row(0, named=True)
    assert row["spearman_rho"] == pytest.approx(-1.0)
    assert row["p_value"] == pytest.approx(spearmanr(distances, gaps).pvalue)
    assert "as predicted" in row["statement"]
    flat = stats.correlation(_pairs([0.1] * 4, [0.1, 0.2, 0.3, 0.4]))
    assert "constant" in flat["statement"][0]
    nan = stats.correlation(_pairs([0.1, math.nan, 0.3, 0.4, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5]))
    assert nan["n_pairs"][0] == 4 and nan["spearman_rho"][0] == pytest.approx(1.0)
    # an archive transferred to itself does not count (distance 0 and its own ticket by construction)
    with_self = _pairs([0.0, 0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.2, 0.3, 0.4]).with_columns(
        pl.Series("same_archive", [True, False, False, False, False]))
    row = stats.correlation(with_self).row(0, named=True)
    assert row["n_pairs"] == 4 and row["spearman_rho"] == pytest.approx(1.0)


def test_report_has_a_transfer_section(archive, tmp_path):
    out = tmp_path / "out"
    run_cli("analyze", str(archive), "-o", out, "-q")
    run_cli("transfer", str(archive), str(archive), "--rounds", "2", "--seeds", "1", "--arms",
            "transferred,random_layer", "-o", out)
    run_cli("report", str(out), "-q")
    page = (out / "report.html").read_text()
    assert '<h2 id="transfer">Ticket transfer</h2>' in page and 'id="table-transfer_pairs"' in page
    from flowscan.report import figure_ids

    assert {"transfer-digits-imp-to-digits-imp", "transfer-sigma-gap"} <= set(figure_ids(page))


def test_runs_made_before_the_new_arguments_still_resume(tmp_path):
    """A run whose manifest predates --mask-from/--init-from/--fill-unmatched resumes."""
    out = tmp_path / "old"
    run_cli("produce", *FAST, "--rounds", "2", "-o", out)
    manifest = out / "seed_0" / "flowscan-run.json"
    data = json.loads(manifest.read_text())
    for key in ("mask_from", "init_from", "fill_unmatched"):
        del data["args"][key]
    manifest.write_text(json.dumps(data))
    import shutil

    shutil.rmtree(out / "seed_0" / "round_0001")   # as if killed during round 1
    # a new argument that is set does differ from a run made before it existed
    refused = run_cli("produce", *FAST, "--rounds", "2", "--mask-from", str(out), "-o", out, expect=1)
    assert "mask_from: None ->" in refused.output
    run_cli("produce", *FAST, "--rounds", "2", "-o", out)
    assert (out / "seed_0" / "round_0001" / "round.json").is_file()


def test_nearest_round_prefers_the_denser_on_a_tie():
    from flowscan.produce.transfer import _nearest

    assert _nearest({0: 1.0, 1: 0.8, 2: 0.64}, 0.7) == 2
    assert _nearest({0: 1.0, 1: 0.75, 2: 0.25}, 0.5) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_transfer_on_cuda_matches_the_recorded_tickets(tmp_path):
    """On a GPU (bf16, CUDA graphs): a transfer of a produce archive to itself trains every arm,
    and the transferred ticket lands within bf16 noise of the target's own."""
    archive = tmp_path / "a"
    run_cli("produce", *FAST, "--device", "cuda", "--rounds", "3", "-o", archive)
    out = tmp_path / "out"
    run_cli("transfer", str(archive), str(archive), "--device", "cuda", "--rounds", "2", "-o", out)
    frame = pl.read_parquet(out / "transfer.parquet")
    assert set(frame["arm"]) == {"transferred", "transferred_source_init", "own", "random_global", "random_layer"}
    acc = dict(zip(frame["arm"], frame["accuracy"]))
    assert abs(acc["transferred"] - acc["own"]) < 0.03


@pytest.mark.parametrize("text", ["[1, 2]", '{"args": 3}', "{not json", '{"args": {"seed": "x"}}'])
def test_a_malformed_run_manifest_is_named_or_ignored(archive, tmp_path, text):
    """A source whose produce manifest is broken: its masks are still used (the manifest only
    names the seed), or the error names the file; never a traceback."""
    import shutil

    source = tmp_path / "src"
    shutil.copytree(archive / "seed_0", source)
    (source / "flowscan-run.json").write_text(text)
    result = run_cli("produce", *FAST, "--rounds", "1", "--mask-from", f"{source}:1", "-o", tmp_path / "o",
                     expect=None)
    if result.exit_code:
        assert "flowscan-run.json" in result.output and "Traceback" not in result.output
    else:
        assert _round(tmp_path / "o" / "seed_0", 0)[2]["density"] == pytest.approx(0.8, abs=1e-3)


def test_heads_of_another_size_transfer_with_fill_unmatched(tmp_path):
    """A 10-class ResNet's tickets on a 12-class task (CIFAR-10 -> CIFAR-100 in small): the head
    differs, so it is an error naming it, or with --fill-unmatched a random head mask at the
    source head's density; BatchNorm step counters round-trip as scalars."""
    recipe = ["--model", "cifar-resnet14", "--epochs", "1", "--batch-size", "64", "--lr", "0.05", "-q"]
    source = tmp_path / "ten"
    run_cli("produce", *recipe, "--data", "synthetic-images:1x8x8:300:10", "--rounds", "2", "-o", source)
    rewind = load_file(str(source / "seed_0" / "rewind.safetensors"))
    assert rewind["bn1.num_batches_tracked"].shape == ()
    target = "synthetic-images:1x8x8:300:12"
    result = run_cli("transfer", str(source), target, "--epochs", "1", "-o", tmp_path / "o1", expect=1)
    assert "fc.weight [10, 64] vs [12, 64]" in result.output and "--fill-unmatched" in result.output
    out = tmp_path / "o2"
    run_cli("transfer", str(source), target, "--epochs", "1", "--fill-unmatched", "--arms",
            "transferred,transferred_source_init,random_layer", "-o", out)
    frame = pl.read_parquet(out / "transfer.parquet")
    assert set(frame["arm"]) == {"transferred", "transferred_source_init", "random_layer"}
    assert (frame["n_filled"] == 1).all()
    source_fc = load_file(str(source / "seed_0" / "round_0001" / "masks.safetensors"))["fc.weight"].mean()
    cell = json.loads(next((out / CELLS).rglob("transferred/seed_0/round_0001.json")).read_text())
    assert cell["filled"] == ["fc.weight"]
    # every tensor but the head is the source mask; the 12-class head keeps the 10-class head's density
    masks = load_file(str(source / "seed_0" / "round_0001" / "masks.safetensors"))
    body_kept = sum(int(m.sum()) for k, m in masks.items() if k != "fc.weight")
    body_size = sum(m.size for k, m in masks.items() if k != "fc.weight")
    expected = (body_kept + round(source_fc * 12 * 64)) / (body_size + 12 * 64)
    assert 0 < source_fc < 1
    assert frame.filter(pl.col("arm") == "transferred")["density"][0] == pytest.approx(expected, abs=1e-12)
