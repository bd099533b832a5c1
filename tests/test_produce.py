"""The IMP producer on CPU: tiny models, digits and synthetic data."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.numpy import load_file

from conftest import analyze, run_cli
from flowscan.errors import FlowscanError
from flowscan.train import data as datasets
from flowscan.train.models import MODELS, build, prunable_names
from flowscan.produce.pruning import next_masks

pytest.importorskip("sklearn")
FAST = ["--model", "mlp", "--data", "digits", "--epochs", "3", "--batch-size", "64", "--lr", "0.05", "-q"]


def _archive(run: Path) -> dict:
    out = {}
    for folder in sorted(run.glob("round_*")):
        for part in ("weights", "masks"):
            out[(folder.name, part)] = load_file(str(folder / f"{part}.safetensors"))
    return out


def test_produce_writes_rounds_that_analyze_reads(tmp_path):
    loud = [a for a in FAST if a != "-q"]
    result = run_cli("produce", *loud, "--rounds", "3", "--seeds", "2", "-o", tmp_path / "ckpts")
    assert result.stdout == ""   # progress goes to stderr, like every command's
    lines = [line for line in result.stderr.splitlines() if not line.startswith("flowscan:")]
    # one numbering: the seed and round as written, then where the call stands
    assert lines[0].startswith("seed 0 round  0: density 1.0000  test acc 0.") and "(1/6, elapsed " in lines[0]
    assert lines[0].endswith("ETA after the next round)") and "ETA " in lines[1] and "(2/6, " in lines[1]
    assert lines[-1].startswith("made 6 round(s) in ") and "images/s" in lines[-1]   # 2 seeds x rounds 0-2
    quiet = run_cli("produce", *FAST, "--rounds", "3", "--seeds", "2", "-o", tmp_path / "quiet")
    assert quiet.output == ""   # -q: no progress at all
    tables = analyze(tmp_path / "ckpts", tmp_path / "out")
    assert tables["runs"]["run"].to_list() == ["seed_0", "seed_1"]
    assert tables["runs"]["format"].to_list() == ["flowscan", "flowscan"]
    density = tables["rounds"].filter(run="seed_0").group_by("round").agg(pl.col("global_density").first())
    # 20 % of the remaining weights, measured from the written masks
    assert density.sort("round")["global_density"].to_list() == pytest.approx([1.0, 0.8, 0.64], abs=1e-4)
    names = set(tables["metrics"]["name"].unique())
    assert {"test_accuracy", "test_loss", "train_loss", "train_steps", "train_seconds"} <= names
    acc = tables["metrics"].filter(run="seed_0", name="test_accuracy", round=0)["value"][0]
    assert acc > 0.9  # an MLP on digits learns
    # pruned weights are exactly zero in the written trained weights, and masks are nested
    r1 = load_file(str(tmp_path / "ckpts" / "seed_0" / "round_0001" / "weights.safetensors"))
    m1 = load_file(str(tmp_path / "ckpts" / "seed_0" / "round_0001" / "masks.safetensors"))
    m2 = load_file(str(tmp_path / "ckpts" / "seed_0" / "round_0002" / "masks.safetensors"))
    for name, mask in m1.items():
        assert not r1[name][mask == 0].any()
        assert not (m2[name] & ~mask).any()
    manifest = json.loads((tmp_path / "ckpts" / "seed_0" / "flowscan-run.json").read_text())
    assert manifest["args"]["model"] == "mlp" and manifest["args"]["seed"] == 0


def test_killed_run_resumes_to_the_same_archive(tmp_path):
    args = [sys.executable, "-m", "flowscan", "produce", *FAST, "--rounds", "4", "--epochs", "20"]
    subprocess.run(args + ["-o", str(tmp_path / "whole")], check=True, capture_output=True)
    run = tmp_path / "killed" / "seed_0"
    proc = subprocess.Popen(args + ["-o", str(tmp_path / "killed")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "round_0001" / "round.json").exists():  # kill it during round 2
        assert proc.poll() is None and time.time() < deadline, "producer ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "round_0003").exists()
    subprocess.run(args + ["-o", str(tmp_path / "killed")], check=True, capture_output=True)
    whole, resumed = _archive(tmp_path / "whole" / "seed_0"), _archive(run)
    assert list(whole) == list(resumed)
    for key in whole:
        for name in whole[key]:
            np.testing.assert_array_equal(whole[key][name], resumed[key][name], err_msg=f"{key} {name}")


def _bytes(run: Path) -> dict:
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()
            and p.name != "flowscan-run.json"}


def test_a_run_continues_to_more_rounds_keeping_what_was_made_even_through_a_kill(tmp_path):
    args = [sys.executable, "-m", "flowscan", "produce", *FAST, "--epochs", "20"]
    subprocess.run(args + ["--rounds", "4", "-o", str(tmp_path / "whole")], check=True, capture_output=True)
    subprocess.run(args + ["--rounds", "2", "-o", str(tmp_path / "grown")], check=True, capture_output=True)
    run = tmp_path / "grown" / "seed_0"
    made = _bytes(run)
    proc = subprocess.Popen(args + ["--rounds", "4", "-o", str(tmp_path / "grown")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "round_0002" / "round.json").exists():   # kill it while it makes round 3
        assert proc.poll() is None and time.time() < deadline, "producer ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = subprocess.run(args + ["--rounds", "4", "-o", str(tmp_path / "grown")], check=True,
                          capture_output=True, text=True)
    assert {k: v for k, v in _bytes(run).items() if k in made} == made   # byte for byte
    whole, grown = _archive(tmp_path / "whole" / "seed_0"), _archive(run)
    assert list(whole) == list(grown)   # as if it had been asked for 4 rounds from the start
    for key in whole:
        for name in whole[key]:
            np.testing.assert_array_equal(whole[key][name], grown[key][name], err_msg=f"{key} {name}")
    assert json.loads((run / "flowscan-run.json").read_text())["args"]["rounds"] == 4
    assert done.returncode == 0


def test_a_lower_target_density_continues_a_run_and_other_changes_are_refused(tmp_path):
    run_cli("produce", *FAST, "--rounds", "9", "--target-density", "0.7", "-o", tmp_path)
    assert sorted(p.name for p in (tmp_path / "seed_0").glob("round_*")) == ["round_0000", "round_0001", "round_0002"]
    made = _bytes(tmp_path / "seed_0")
    result = run_cli("produce", *FAST[:-1], "--rounds", "9", "--target-density", "0.5", "-o", tmp_path)
    assert "continuing with new stopping arguments (target_density: 0.7 -> 0.5)" in result.output
    assert {k: v for k, v in _bytes(tmp_path / "seed_0").items() if k in made} == made
    assert len(list((tmp_path / "seed_0").glob("round_*"))) == 5     # 0.8^4 = 0.41 <= 0.5
    refused = run_cli("produce", *FAST, "--rounds", "12", "--lr", "0.1", "-o", tmp_path, expect=1)
    assert "made with other arguments (lr: 0.05 -> 0.1);" in refused.output   # rounds 9 -> 12 is no objection


def test_other_arguments_into_the_same_folder_are_refused(tmp_path):
    run_cli("produce", *FAST, "--rounds", "2", "-o", tmp_path)
    result = run_cli("produce", *FAST, "--rounds", "2", "--prune-fraction", "0.3", "-o", tmp_path, expect=1)
    assert "holds a run made with other arguments (prune_fraction: 0.2 -> 0.3)" in result.output
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.safetensors")}
    again = run_cli("produce", *FAST, "--rounds", "2", "-o", tmp_path)  # same arguments: nothing to do
    assert again.output == ""   # -q: no round was trained, so there is nothing to report
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.safetensors")} == before


def test_late_rewinding_trains_later_rounds_from_the_rewind_step(tmp_path):
    run_cli("produce", *FAST, "--rounds", "2", "--rewind", "0.5", "-o", tmp_path)
    run = tmp_path / "seed_0"
    from safetensors import safe_open

    with safe_open(str(run / "rewind.safetensors"), "np") as f:
        step = json.loads(f.metadata()["step"])
    r0 = json.loads((run / "round_0000" / "round.json").read_text())["metrics"]
    r1 = json.loads((run / "round_0001" / "round.json").read_text())["metrics"]
    assert r0["train_steps"] == 2 * step and r1["train_steps"] == step


def test_pruning_counts_and_schedules():
    torch.manual_seed(0)
    weights = {"a": torch.randn(10, 10), "b": torch.randn(5, 20)}
    masks = {k: torch.ones_like(v, dtype=torch.bool) for k, v in weights.items()}
    glob = next_masks(weights, masks, 0.2)
    assert sum(int(m.sum()) for m in glob.values()) == 160
    kept = torch.cat([weights[k][glob[k]].abs() for k in weights])
    dropped = torch.cat([weights[k][~glob[k]].abs() for k in weights])
    assert kept.min() >= dropped.max()  # the smallest magnitudes went, globally
    layer = next_masks(weights, masks, 0.2, "layerwise")
    assert [int(m.sum()) for m in layer.values()] == [80, 80]
    # BERT tickets: 10 % of the original count per round, so x(n) = 1/(10 - n)
    m = masks
    for expected in (180, 160, 140):
        m = next_masks(weights, m, 0.1, "original")
        assert sum(int(v.sum()) for v in m.values()) == expected
    ties = next_masks({"t": torch.ones(10)}, {"t": torch.ones(10, dtype=torch.bool)}, 0.3)
    assert ties["t"].tolist() == [False] * 3 + [True] * 7  # ties go by position: reproducible


@pytest.mark.parametrize("model, data", [("lenet", "synthetic-images:1x28x28:200"),
                                         ("cifar-resnet14", "synthetic-images:3x16x16:128"),
                                         ("bert-small", "synthetic-tokens:16:200")])
def test_every_model_family_produces_and_scans(tmp_path, model, data):
    run_cli("produce", "--model", model, "--data", data, "--rounds", "2", "--epochs", "1", "--batch-size", "32",
            "--lr", "0.01", "-q", "-o", tmp_path / "c")
    tables = analyze(tmp_path / "c", tmp_path / "out")
    assert tables["runs"]["status"].to_list() == ["ok"]
    expected = {"lenet": "per-tensor", "cifar-resnet14": "resnet-stages", "bert-small": "bert-layers"}[model]
    assert tables["runs"]["blocks"][0] == f"{expected} (auto-detected)"


def test_model_names_fit_the_scanner_presets():
    from flowscan.blocks import PRESETS

    for name, spec in MODELS.items():
        shape = (16, 100) if spec.kind == "tokens" else (3, 32, 32)
        model, _ = build(name, shape, 10)
        names = prunable_names(model, spec)
        labels = PRESETS[spec.preset].labels(names)
        assert None not in labels, (name, [n for n, lab in zip(names, labels) if lab is None])
    r20, _ = build("cifar-resnet20", (3, 32, 32), 10)
    assert sum(p.numel() for p in r20.parameters()) == 272_474  # He et al.'s 0.27 M


def test_dataset_errors_are_clear(tmp_path):
    with pytest.raises(FlowscanError, match="unknown dataset 'nope'"):
        datasets.load("nope")
    with pytest.raises(FlowscanError, match="not a folder"):
        datasets.load(f"fashion-mnist:{tmp_path / 'missing'}")
    with pytest.raises(FlowscanError, match="missing train-images-idx3-ubyte"):
        datasets.load(f"fashion-mnist:{tmp_path}")
    with pytest.raises(FlowscanError, match="data_batch_1: missing"):
        datasets.load(f"cifar10:{tmp_path}")
    result = run_cli("produce", "--model", "lenet", "--data", "synthetic-tokens:8:50", "--rounds", "1",
                     "-o", tmp_path / "x", expect=1)
    assert "model lenet takes image but dataset synthetic-tokens has tokens" in result.output


def _write_cifar(folder: Path, n=20, evil=None):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n))}
        if evil and name == "data_batch_3":
            batch["x"] = evil
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_batches_are_read_without_plain_pickle(tmp_path):
    _write_cifar(tmp_path / "c10")
    d = datasets.load(f"cifar10:{tmp_path / 'c10'}")
    assert d.x_train.shape == (100, 3, 32, 32) and d.x_test.shape == (20, 3, 32, 32)
    marker = tmp_path / "pwned"
    _write_cifar(tmp_path / "evil", evil=_Evil(marker))
    with pytest.raises(FlowscanError, match="refused"):
        datasets.load(f"cifar10:{tmp_path / 'evil'}")
    assert not marker.exists()


def test_fashion_mnist_idx_files(tmp_path):
    import gzip
    import struct

    def idx(path, array):
        header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
        with gzip.open(path, "wb") as f:
            f.write(header + array.astype(np.uint8).tobytes())

    rng = np.random.default_rng(1)
    idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (30, 28, 28)))
    idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 30))
    idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (10, 28, 28)))
    idx(tmp_path / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 10))
    d = datasets.load(f"fashion-mnist:{tmp_path}")
    assert d.x_train.shape == (30, 1, 28, 28) and d.y_test.shape == (10,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_path_with_cuda_graphs(tmp_path):
    run_cli("produce", "--model", "cifar-resnet20", "--data", "synthetic-images:3x32x32:2048", "--rounds", "2",
            "--epochs", "2", "--seeds", "2", "--augment", "-q", "-o", tmp_path / "c")
    tables = analyze(tmp_path / "c", tmp_path / "out")
    assert tables["runs"]["status"].to_list() == ["ok", "ok"]


def test_rewind_point_is_the_initialization_and_stays_so(tmp_path):
    run_cli("produce", *FAST, "--rounds", "3", "-o", tmp_path)
    torch.manual_seed(0)
    model, _ = build("mlp", (1, 8, 8), 10)
    rewind = load_file(str(tmp_path / "seed_0" / "rewind.safetensors"))
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(rewind[name], value.numpy())


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-net", "--data", "digits"], "unknown model 'no-such-net'"),
    (["--model", "lenet", "--data", "digits"], "--model lenet cannot take --data digits"),
])
def test_bad_model_or_data_fails_before_anything_is_written(tmp_path, args, message):
    from conftest import run_cli

    out = tmp_path / "arch"
    result = run_cli("produce", *args, "--rounds", "1", "--epochs", "0.1", "-o", out, "-q", expect=1)
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_a_folder_where_no_round_completed_does_not_lock_the_arguments(tmp_path):
    from flowscan import layout
    from flowscan.produce.imp import check_or_write_manifest

    run = tmp_path / "seed_0"
    run.mkdir()
    check_or_write_manifest(run, {"model": "lenet"})
    check_or_write_manifest(run, {"model": "mlp"})          # nothing completed: replaced
    assert layout.read_json(run / layout.RUN_MANIFEST)["args"] == {"model": "mlp"}


def test_progress_counts_only_the_rounds_this_call_makes_and_totals_the_commands_time(tmp_path):
    import time

    loud = [a for a in FAST if a != "-q"]
    run_cli("produce", *FAST, "--rounds", "2", "-o", tmp_path / "ckpts")
    started = time.monotonic()
    result = run_cli("produce", *loud, "--rounds", "4", "-o", tmp_path / "ckpts")   # extends rounds 0-1
    wall = time.monotonic() - started
    lines = [line for line in result.stderr.splitlines() if not line.startswith("flowscan:")]
    assert lines[0].startswith("seed 0 round  2:") and "(1/2, elapsed" in lines[0]
    assert lines[1].startswith("seed 0 round  3:") and "(2/2, elapsed" in lines[1] and "ETA" not in lines[1]
    made = float(lines[-1].split(" in ")[1].split(" s")[0])
    assert lines[-1].startswith("made 2 round(s) in ") and 0.8 * wall - 0.05 <= made <= wall + 0.05   # 0.1 s printed
