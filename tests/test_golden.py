"""analyze on each bundled fixture reproduces values known in closed form or computed another way."""

from __future__ import annotations

import math
import re
import sys

import numpy as np
import polars as pl
import pytest
import torch
from polars.testing import assert_frame_equal
from safetensors.numpy import load_file, save_file

from conftest import FIXTURES, analyze

sys.path.insert(0, str(FIXTURES))
import make_fixtures as mf  # noqa: E402

CLOSED_BLOCKS = ["--blocks", r"^(a|b)\."]
FORMATS = ["flowscan", "prune-style", "safetensors", "npz"]


@pytest.fixture(scope="module")
def closed(tmp_path_factory):
    return analyze(FIXTURES / "closed-form", tmp_path_factory.mktemp("closed"), *CLOSED_BLOCKS)


def _eigen(tables, run, block, quantity="M"):
    return tables["eigen"].filter(run=run, block=block, quantity=quantity).row(0, named=True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_closed_form_sigma_to_1e9(closed, fmt):
    run = fmt
    for block, sigma in mf.CLOSED_SIGMA.items():
        row = _eigen(closed, run, block)
        assert row["sigma_mean"] == pytest.approx(sigma, abs=1e-9)
        assert row["sigma_fit"] == pytest.approx(sigma, abs=1e-9)
        assert row["lambda_mean"] == pytest.approx(mf.C ** sigma, abs=1e-9)
        assert row["n_pairs"] == mf.CLOSED_ROUNDS - 1
        assert row["eigen_ok"]
    # every block is pruned at the same rate: P is constant, sigma_P = 0
    assert _eigen(closed, run, "a", "P")["sigma_mean"] == pytest.approx(0.0, abs=1e-12)
    steps = closed["steps"].filter(run=run)
    assert steps["c"].to_numpy() == pytest.approx(1.25, abs=1e-12)
    assert steps["x"].to_numpy() == pytest.approx(0.2, abs=1e-12)


def test_closed_form_unmatched_tensors_form_the_other_block(closed):
    rounds = closed["rounds"].filter(run="flowscan").sort("round")
    other = rounds.filter(block="(other)")
    expected = [mf.closed_form_shares(n)["rest"] for n in range(mf.CLOSED_ROUNDS)]
    assert other["M"].to_list() == pytest.approx(expected, abs=1e-12)
    # its per-step sigma is ln(M(n+1)/M(n)) / ln 1.25, from the closed-form shares
    sig = closed["steps"].filter(run="flowscan", block="(other)", quantity="M").sort("round")
    hand = [math.log(expected[n + 1] / expected[n]) / math.log(1.25) for n in range(mf.CLOSED_ROUNDS - 1)]
    assert sig["sigma"].to_list() == pytest.approx(hand, abs=1e-9)
    assert rounds.filter(block="a")["n_params"].to_list() == [625] * mf.CLOSED_ROUNDS
    assert rounds.filter(block="b")["n_unpruned"].to_list() == [1250 * 4 ** n // 5 ** n for n in range(5)]


def test_same_archive_in_four_formats_gives_identical_tables(closed):
    def strip(df):
        return df.drop("run").sort(df.columns[1:4])
    for table in ("rounds", "steps", "eigen"):
        ref = strip(closed[table].filter(run="flowscan"))
        for fmt in FORMATS[1:]:
            assert_frame_equal(strip(closed[table].filter(run=fmt)), ref,
                               check_exact=False, rel_tol=1e-12, abs_tol=1e-15)


def test_shares_sum_to_one_in_every_round_of_every_fixture(tmp_path):
    tables = analyze(FIXTURES, tmp_path)
    assert tables["runs"]["status"].to_list() == ["ok"] * tables["runs"].height
    sums = tables["rounds"].group_by("run", "round").agg(pl.col("M").sum(), pl.col("P").sum())
    assert sums["M"].to_numpy() == pytest.approx(1.0, abs=1e-12)
    assert sums["P"].to_numpy() == pytest.approx(1.0, abs=1e-12)


def test_results_do_not_depend_on_jobs_or_tensor_order(tmp_path, closed):
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    for path in sorted((FIXTURES / "closed-form" / "safetensors").iterdir()):
        tensors = load_file(str(path))
        save_file({k: tensors[k] for k in reversed(list(tensors))}, str(shuffled / path.name))
    parallel = analyze(shuffled, tmp_path / "out", "--jobs", "2", *CLOSED_BLOCKS)
    ref = closed["eigen"].filter(run="safetensors").drop("run")
    assert_frame_equal(parallel["eigen"].drop("run").sort("block", "quantity"),
                       ref.sort("block", "quantity"), check_exact=False, rel_tol=1e-12)


def test_fixtures_are_reproducible_from_the_script(tmp_path, closed):
    mf.main(["closed-form", "--out", str(tmp_path)])
    again = analyze(tmp_path / "closed-form", tmp_path / "out", *CLOSED_BLOCKS)
    assert_frame_equal(again["rounds"], closed["rounds"])


def test_flowscan_layout_metrics_come_from_the_round_manifests(closed):
    metrics = closed["metrics"].filter(run="flowscan", name="test_accuracy").sort("round")
    assert metrics["value"].to_list() == pytest.approx([0.9 - 0.01 * n for n in range(5)])


# --- a real torch.nn.utils.prune run (Chen et al. CV layout) ------------------------------------


def _torch_block_sums(path, blocks):
    """Independent path: torch itself, on files this test suite's fixture script wrote."""
    sd = torch.load(path, weights_only=True)["state_dict"]
    out = {}
    for name in sd:
        if not name.endswith("weight_mask"):
            continue
        base = name[: -len("_mask")]
        w = sd[base + "_orig"] * sd[name]
        block = next(b for b in blocks if base.startswith(b))
        s, n = out.get(block, (0.0, 0))
        out[block] = (s + float(w.abs().double().sum()), n + int(sd[name].sum()))
    return out


def test_real_prune_api_run_matches_torch(tmp_path):
    run = FIXTURES / "torch-prune" / "seed0"
    tables = analyze(run, tmp_path, "--blocks", "resnet-stages", "--jobs", "2")
    rounds = tables["rounds"]
    assert sorted(rounds["block"].unique()) == ["layer1", "layer2"]  # stem conv1 and fc never pruned
    for k in range(1, 4):
        sums = _torch_block_sums(run / f"{k}checkpoint.pth.tar", ["layer1", "layer2"])
        total = sum(s for s, _ in sums.values())
        for block, (abs_sum, kept) in sums.items():
            row = rounds.filter(round=k, block=block).row(0, named=True)
            assert row["abs_sum"] == pytest.approx(abs_sum, rel=1e-6)
            assert row["n_unpruned"] == kept
            assert row["M"] == pytest.approx(abs_sum / total, rel=1e-6)
    # global_unstructured prunes round(20 % of the remaining): c within rounding of 1.25
    assert tables["steps"]["c"].to_numpy() == pytest.approx(1.25, rel=2e-3)
    # {k}checkpoint (end of training, what was pruned) is preferred over {k}model_SA_best
    best = tables["metrics"].filter(name="best_sa").sort("round")["value"].to_list()
    assert best == pytest.approx([torch.load(run / f"{k}checkpoint.pth.tar", weights_only=True)["best_sa"]
                                  for k in range(4)])


def test_legacy_torch_files_read_the_same(tmp_path):
    src = FIXTURES / "torch-prune" / "seed0"
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for path in src.glob("*checkpoint.pth.tar"):
        obj = torch.load(path, weights_only=True)
        torch.save(obj, legacy / path.name, _use_new_zipfile_serialization=False)
    a = analyze(src, tmp_path / "a")
    b = analyze(legacy, tmp_path / "b")
    assert_frame_equal(a["rounds"].drop("run"), b["rounds"].drop("run"))


# --- open_lth --------------------------------------------------------------------------------------


def test_open_lth_applies_masks_and_ignores_branches(tmp_path):
    tables = analyze(FIXTURES / "open_lth", tmp_path)
    runs = tables["runs"].sort("run")
    assert runs["run"].to_list() == [f"lottery_0123456789abcdef0123456789abcdef/replicate_{r}" for r in (1, 2)]
    assert runs["n_rounds"].to_list() == [4, 4]  # lottery_branch_* and level_pretrain are not rounds
    assert runs["blocks"].to_list() == ["openlth-cifar-stages (auto-detected)"] * 2
    run = runs["run"][0]
    rounds = tables["rounds"].filter(run=run)
    stage_of = {}  # ResNet-14: D = (14 - 2) / 6 = 2 residual blocks per stage
    for name in mf.openlth_cifar_shapes():
        m = re.match(r"blocks\.(\d+)\.", name)
        stage_of[name] = f"stage{int(m.group(1)) // 2 + 1}" if m else ("stem" if name.startswith("conv") else "fc")
    for level in range(4):
        main = FIXTURES / "open_lth" / run / f"level_{level}" / "main"
        weights = torch.load(main / "model_ep2_it0.pth", weights_only=True)
        masks = torch.load(main / "mask.pth", weights_only=True)
        expected = {}
        for name, mask in masks.items():
            s, n = expected.get(stage_of[name], (0.0, 0))
            expected[stage_of[name]] = (s + float((weights[name] * mask).abs().double().sum()), n + int(mask.sum()))
        total = sum(s for s, _ in expected.values())
        for block, (abs_sum, kept) in expected.items():
            row = rounds.filter(round=level, block=block).row(0, named=True)
            assert row["M"] == pytest.approx(abs_sum / total, rel=1e-6)
            assert row["n_unpruned"] == kept
    acc = tables["metrics"].filter(run=run, name="test_accuracy").sort("round")["value"].to_list()
    assert acc == pytest.approx([0.8 - 0.02 * level + 0.01 for level in range(4)])  # last iteration


# --- BERT tickets ----------------------------------------------------------------------------------


def test_bert_tickets_round_semantics(tmp_path):
    run = FIXTURES / "bert-tickets" / "mrpc"
    tables = analyze(FIXTURES / "bert-tickets", tmp_path)
    row = tables["runs"].row(0, named=True)
    assert row["format"] == "bert-tickets" and row["status"] == "ok"
    assert row["n_rounds"] == 4            # the last folder's all-zero mask.pt is not a round
    assert row["n_prunable_tensors"] == 2 * 6 + 1  # encoder linears + pooler; not embeddings/classifier
    rounds = tables["rounds"].sort("round", "block")
    dens = rounds.group_by("round").agg(pl.col("global_density").first()).sort("round")
    assert dens["global_density"].to_list() == pytest.approx([1.0, 0.9, 0.8, 0.7], abs=1e-12)
    steps = tables["steps"].filter(block="layer0", quantity="M").sort("round")
    assert steps["x"].to_list() == pytest.approx([1 / (10 - n) for n in range(3)], abs=1e-12)
    assert steps["c"][2] == pytest.approx(8 / 7, abs=1e-12)
    # round n's mask is the n-th folder's mask.pt (1-based): check P from the mask files alone
    folders = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for n in (1, 2, 3):
        masks = torch.load(folders[n - 1] / "mask.pt", weights_only=True)
        kept = {b: sum(int(v.sum()) for k, v in masks.items() if (f"layer.{b[-1]}." in k if b != "pooler" else "pooler" in k))
                for b in ("layer0", "layer1", "pooler")}
        for block, k in kept.items():
            assert rounds.filter(round=n, block=block)["n_unpruned"][0] == k
    acc = tables["metrics"].filter(name="eval_acc").sort("round")["value"].to_list()
    assert acc == pytest.approx([0.85 - 0.01 * k for k in range(1, 5)])


# --- sharded HF folders, masks inferred from zeros -------------------------------------------------


def test_sharded_folders_infer_masks_from_zeros(tmp_path):
    tables = analyze(FIXTURES / "hf-sharded", tmp_path, "--blocks", "per-tensor")
    assert tables["runs"]["mask_source"].to_list() == ["inferred"]
    rounds = tables["rounds"]
    assert "encoder.layer.0.dense.bias" not in rounds["block"].to_list()  # 1-D: never inferred
    for n in range(3):
        folder = FIXTURES / "hf-sharded" / f"step_{n}"
        tensors = {}
        for shard in folder.glob("*.safetensors"):
            tensors.update(load_file(str(shard)))
        for name in ("encoder.layer.0.dense.weight", "encoder.layer.1.dense.weight", "head.weight"):
            row = rounds.filter(round=n, block=name.removesuffix(".weight")).row(0, named=True)
            assert row["n_unpruned"] == int(np.count_nonzero(tensors[name]))
            assert row["abs_sum"] == pytest.approx(float(np.abs(tensors[name]).astype(np.float64).sum()), rel=1e-9)


def test_lth_diet_layout_reads_like_open_lth(tmp_path, copy_fixture):
    src = FIXTURES / "open_lth" / "lottery_0123456789abcdef0123456789abcdef" / "replicate_1"
    diet = tmp_path / "diet" / "replicate_0"  # lth_diet counts replicates from 0
    for level in range(4):
        main = diet / f"level_{level}" / "main"
        main.mkdir(parents=True)
        old = src / f"level_{level}" / "main"
        torch.save(torch.load(old / "model_ep2_it0.pth", weights_only=True), main / "model_final.pt")
        torch.save(torch.load(old / "model_ep0_it0.pth", weights_only=True), main / "model_init.pt")
        masks = torch.load(old / "mask.pth", weights_only=True)
        torch.save({f"module.{k}": v for k, v in masks.items()}, main / "mask.pt")  # prefix on masks only
    a = analyze(src, tmp_path / "a")
    b = analyze(tmp_path / "diet", tmp_path / "b")
    assert b["runs"]["run"].to_list() == ["replicate_0"]
    assert_frame_equal(a["rounds"].drop("run"), b["rounds"].drop("run"))


def test_chen_imagenet_layout_without_round_zero_and_with_a_mask_dict(tmp_path):
    # {k}model_best.pth.tar, state 0 never saved; masks under the checkpoint's "mask" key
    rng = np.random.default_rng(5)
    shapes = {"layer1.0.conv1.weight": (8, 4, 3, 3), "layer2.0.conv1.weight": (16, 8, 3, 3)}
    mask = {k: np.ones(s, np.float32) for k, s in shapes.items()}
    expected = {}
    for k in (1, 2, 3):
        w = {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}
        for n in shapes:  # prune 20 % of each tensor's survivors
            alive = np.abs(w[n])[mask[n] == 1]
            mask[n] = ((mask[n] == 1) & (np.abs(w[n]) > np.quantile(alive, 0.2))).astype(np.float32)
        torch.save({"state": k, "best_acc1": 70.0 + k,
                    "state_dict": {f"module.{n}": torch.from_numpy(v * mask[n]) for n, v in w.items()},
                    "mask": {f"module.{n}": torch.from_numpy(m)
                             for n, m in mask.items()}},
                   tmp_path / f"{k}model_best.pth.tar")
        expected[k] = {n.split(".")[0]: int(m.sum()) for n, m in mask.items()}
    tables = analyze(tmp_path, tmp_path / "out")
    rounds = tables["rounds"]
    assert sorted(rounds["round"].unique().to_list()) == [1, 2, 3]
    for k, kept in expected.items():
        for block, n in kept.items():
            assert rounds.filter(round=k, block=block)["n_unpruned"][0] == n
    assert tables["metrics"].filter(name="best_acc1").sort("round")["value"].to_list() == [71.0, 72.0, 73.0]
    assert tables["steps"].filter(block="layer1", quantity="P")["round"].to_list() == [1, 2]



def test_flat_safetensors_with_separate_mask_files(tmp_path):
    rounds = mf.closed_form_rounds()
    for n, (weights, masks) in enumerate(rounds):
        save_file(weights, str(tmp_path / f"round_{n}.safetensors"))
        save_file({k: v.astype(np.uint8) for k, v in masks.items()}, str(tmp_path / f"round_{n}.masks.safetensors"))
    tables = analyze(tmp_path, tmp_path / "out", *CLOSED_BLOCKS)
    assert _eigen(tables, tmp_path.name, "a")["sigma_mean"] == pytest.approx(0.5, abs=1e-9)
    assert _eigen(tables, tmp_path.name, "b")["sigma_mean"] == pytest.approx(-1.0, abs=1e-9)


def test_step_numbered_checkpoint_folders_are_rounds_by_rank(tmp_path):
    for n, (weights, masks) in enumerate(mf.closed_form_rounds()):
        folder = tmp_path / f"checkpoint-{(n + 1) * 250}"
        folder.mkdir()
        save_file(weights, str(folder / "model.safetensors"))
        save_file({k: v.astype(np.uint8) for k, v in masks.items()}, str(folder / "masks.safetensors"))
    tables = analyze(tmp_path, tmp_path / "out", *CLOSED_BLOCKS)
    assert sorted(tables["rounds"]["round"].unique().to_list()) == [0, 1, 2, 3, 4]
    assert "rank" in tables["runs"]["notes"][0]
    assert _eigen(tables, tmp_path.name, "b")["sigma_fit"] == pytest.approx(-1.0, abs=1e-9)
