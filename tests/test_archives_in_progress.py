"""Archives as they are on a researcher's disk: runs in progress, rounds missing, seeds as folders,
packed masks, a run given as PATH. Never a silent answer, never a lost analysis."""

from __future__ import annotations

import io
import json
import math
import shutil

import msgpack
import numpy as np
import polars as pl
import pytest
import torch
from safetensors.numpy import load_file, save_file

from conftest import FIXTURES, analyze, read_tables, run_cli
from flowscan import flow, pipeline, tables
from flowscan.io import msgpack_file

OPENLTH = FIXTURES / "open_lth" / "lottery_0123456789abcdef0123456789abcdef"
CLOSED = ("--blocks", r"^(a|b)\.")


def _runs(frames) -> dict[str, dict]:
    return {r["run"]: r for r in frames["runs"].iter_rows(named=True)}


# -- 1. an open_lth level still training --------------------------------------------------------
def test_open_lth_level_without_its_final_weights_is_incomplete_not_read_from_the_rewind(tmp_path):
    archive = tmp_path / "lottery"
    shutil.copytree(OPENLTH, archive)
    full = analyze(archive, tmp_path / "full")
    (archive / "replicate_1" / "level_3" / "main" / "model_ep2_it0.pth").unlink()   # still training
    result = run_cli("analyze", archive, "-o", tmp_path / "out")
    frames = read_tables(tmp_path / "out")
    row = _runs(frames)["replicate_1"]
    assert row["status"] == "ok"
    assert row["complete_rounds"] == [0, 1, 2] and row["incomplete_rounds"] == [3] and row["missing_rounds"] == []
    assert "round 3 is incomplete" in row["notes"] and "model_ep2_it0.pth" in row["notes"]
    assert "warning: run replicate_1: round 3 is incomplete" in result.stderr
    # rounds 0-2 are exactly those of the complete archive: level 3 was not read from its rewind weights
    mine = frames["rounds"].filter(run="replicate_1")
    theirs = full["rounds"].filter(pl.col("run") == "replicate_1", pl.col("round") < 3)
    assert mine.equals(theirs)
    assert "final step" in row["notes"]


def test_open_lth_level_missing_in_the_middle_is_a_gap(tmp_path):
    archive = tmp_path / "lottery"
    shutil.copytree(OPENLTH, archive)
    (archive / "replicate_2" / "level_1" / "main" / "model_ep2_it0.pth").unlink()
    frames = analyze(archive, tmp_path / "out")
    row = _runs(frames)["replicate_2"]
    assert row["complete_rounds"] == [0, 2, 3] and row["missing_rounds"] == [1]
    steps = frames["steps"].filter(run="replicate_2", quantity="M", block=frames["steps"]["block"][0])
    assert steps["round"].to_list() == [0, 2] and steps["span"].to_list() == [2, 1]


# -- 2. a round missing in the middle; no verdict without an error bar ----------------------------
def test_round_missing_in_the_middle_is_named_and_its_step_spans_the_gap(tmp_path, copy_fixture):
    run = copy_fixture("closed-form/safetensors", "run")
    (run / "round_2.safetensors").unlink()
    result = run_cli("analyze", run, "-o", tmp_path / "out", *CLOSED)
    frames = read_tables(tmp_path / "out")
    row = _runs(frames)["run"]
    assert row["missing_rounds"] == [2] and row["complete_rounds"] == [0, 1, 3, 4]
    assert "round(s) 2 missing inside the run" in row["notes"]
    assert "warning: run run: round(s) 2 missing" in result.stderr
    steps = frames["steps"].filter(block="a", quantity="M")
    assert steps["round"].to_list() == [0, 1, 3] and steps["span"].to_list() == [1, 2, 1]
    # the closed form holds across the gap too: sigma_a = 0.5 exactly, c measured over two rounds
    assert steps["sigma"].to_list() == pytest.approx([0.5, 0.5, 0.5], abs=1e-9)
    assert steps["c"][1] == pytest.approx(steps["c"][0] * steps["c"][2], rel=1e-9)
    survival = frames["survival"].filter(block="a")
    assert survival["round"].to_list() == [0, 1, 3] and survival["span"].to_list() == [1, 2, 1]


def test_one_step_gives_no_verdict(tmp_path, copy_fixture):
    run = copy_fixture("torch-prune/seed0", "run")
    for extra in sorted(run.glob("*checkpoint*"))[2:]:
        extra.unlink()
    result = run_cli("analyze", run, "-o", tmp_path / "out")
    eigen = read_tables(tmp_path / "out")["eigen"]
    assert eigen["n_pairs"].max() == 1
    assert set(eigen["relevance"]) == {"undetermined"}
    assert "relevant" not in result.stdout.replace("undetermined", "").replace("irrelevant", "")


@pytest.mark.parametrize("mean, sem", [(0.4, float("nan")), (-0.4, float("nan")), (float("nan"), float("nan"))])
def test_relevance_is_undetermined_without_a_finite_sem(mean, sem):
    assert flow.relevance(mean, sem) == "undetermined"


# -- 3. one run's failure after reading costs only that run ---------------------------------------
def _two_npz_runs(tmp_path):
    root = tmp_path / "runs"
    for name in ("good", "bad"):
        shutil.copytree(FIXTURES / "closed-form" / "npz", root / name)
    return root


def test_shape_change_in_one_npz_run_costs_only_that_run(tmp_path):
    root = _two_npz_runs(tmp_path)
    target = root / "bad" / "round_2.npz"
    with np.load(target) as z:
        arrays = {k: z[k] for k in z.files}
    name = "rest.weight"                                  # (75, 25) -> (25, 75)
    arrays[name], arrays[name + "_mask"] = arrays[name].T.copy(), arrays[name + "_mask"].T.copy()
    np.savez(target, **arrays)
    result = run_cli("analyze", root, "-o", tmp_path / "out", *CLOSED, expect=1)
    frames = read_tables(tmp_path / "out")
    runs = _runs(frames)
    assert runs["good"]["status"] == "ok" and runs["bad"]["status"] == "error"
    assert set(frames["rounds"]["run"]) == {"good"}
    error = runs["bad"]["error"]
    assert repr(name) in error and "shape changes between rounds" in error
    assert "in round 1" in error and "in round 2" in error
    assert "broadcast" not in result.output


def test_dtype_kind_change_is_a_named_error(tmp_path):
    root = _two_npz_runs(tmp_path)
    target = root / "bad" / "round_3.npz"
    with np.load(target) as z:
        arrays = {k: z[k] for k in z.files}
    name = next(k for k in arrays if not k.endswith("_mask"))
    arrays[name] = np.round(arrays[name] * 100).astype(np.int32)
    np.savez(target, **arrays)
    run_cli("analyze", root, "-o", tmp_path / "out", *CLOSED, expect=1)
    runs = _runs(read_tables(tmp_path / "out"))
    assert runs["good"]["status"] == "ok"
    assert "dtype kind changes between rounds: floating point in round 2" in runs["bad"]["error"]
    assert "integer in round 3" in runs["bad"]["error"]


STAGES = {
    "survival": ("flowscan.pipeline.survival_counts", "survival"),
    "flow": ("flowscan.flow.compute_flow", "assembly"),
    "eigen": ("flowscan.flow.eigen_summaries", "assembly"),
    "blocks": ("flowscan.blocks.BlockRules.resolve", "assembly"),
    "tables": ("flowscan.tables._grid", "building its tables"),
}


@pytest.mark.parametrize("stage", STAGES)
def test_a_failure_injected_into_each_stage_costs_only_its_run(tmp_path, monkeypatch, stage):
    root = _two_npz_runs(tmp_path)
    target, where = STAGES[stage]
    module_name, attr = target.rsplit(".", 1)
    import importlib

    try:
        owner = importlib.import_module(module_name)
    except ModuleNotFoundError:
        mod, cls = module_name.rsplit(".", 1)
        owner = getattr(importlib.import_module(mod), cls)
    real = getattr(owner, attr)
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:   # the first run to reach this stage fails there, the other does not
            raise RuntimeError(f"injected into {stage}")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attr, failing)
    run_cli("analyze", root, "-o", tmp_path / "out", *CLOSED, "--no-cache", expect=1)
    frames = read_tables(tmp_path / "out")
    runs = _runs(frames)
    failed = [r for r in runs.values() if r["status"] == "error"]
    assert len(failed) == 1, runs
    assert f"injected into {stage}" in failed[0]["error"] and where in failed[0]["error"]
    ok = [name for name, r in runs.items() if r["status"] == "ok"]
    assert len(ok) == 1 and set(frames["rounds"]["run"]) == set(ok) and set(frames["eigen"]["run"]) == set(ok)


# -- 4. seeds as folders above the rounds, for every reader ---------------------------------------
LAYOUTS = {
    "npz": (FIXTURES / "closed-form" / "npz", CLOSED),
    "safetensors": (FIXTURES / "closed-form" / "safetensors", CLOSED),
    "prune-style": (FIXTURES / "closed-form" / "prune-style", CLOSED),
    "flowscan": (FIXTURES / "closed-form" / "flowscan", CLOSED),
    "hf-sharded": (FIXTURES / "hf-sharded", ()),
    "torch-prune": (FIXTURES / "torch-prune" / "seed0", ()),
    "open_lth": (OPENLTH / "replicate_1", ()),
    "bert-tickets": (FIXTURES / "bert-tickets" / "mrpc", ()),
    "flax": (FIXTURES / "flax" / "imp-mlp", ()),
    "orbax": (FIXTURES / "orbax" / "imp-mlp", ()),
    "orbax-standard": (FIXTURES / "orbax" / "closed-form", CLOSED),
    "keras": (FIXTURES / "keras" / "closed-form-h5", CLOSED),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_seed_folders_above_the_rounds_are_runs(tmp_path, layout):
    source, blocks = LAYOUTS[layout]
    alone = analyze(source, tmp_path / "alone", *blocks)
    archive = tmp_path / "archive"
    for seed in ("seed_0", "seed_1"):
        shutil.copytree(source, archive / seed)
    frames = analyze(archive, tmp_path / "out", *blocks)
    assert sorted(frames["runs"]["run"]) == ["seed_0", "seed_1"]
    assert set(frames["runs"]["status"]) == {"ok"}
    name = alone["runs"]["run"][0]
    assert name == source.name   # PATH is the run: named after its folder
    expected = alone["rounds"].drop("run")
    for seed in ("seed_0", "seed_1"):
        assert frames["rounds"].filter(run=seed).drop("run").equals(expected)


def test_orbax_seed_folders_of_standard_checkpointer_steps(tmp_path):
    archive = tmp_path / "archive"
    for seed in range(2):
        shutil.copytree(FIXTURES / "orbax" / "imp-mlp", archive / f"seed_{seed}")
    inspected = json.loads(run_cli("inspect", archive, "--json").stdout)
    assert [r["run"] for r in inspected] == ["seed_0", "seed_1"]
    assert all(r["complete_rounds"] == [0, 1, 2, 3] for r in inspected)
    assert not any("seed_{round}" in " ".join(r["notes"]) for r in inspected)


# -- 5. jaxpruner's packed masks ---------------------------------------------------------------
def _ext(arr: np.ndarray) -> msgpack.ExtType:
    return msgpack.ExtType(1, msgpack.packb([list(arr.shape), arr.dtype.name.encode(), arr.tobytes()],
                                            use_bin_type=True))


def _encode(node):
    if isinstance(node, dict):
        return {k: _encode(v) for k, v in node.items()}
    if isinstance(node, (np.ndarray, np.generic)) or hasattr(node, "__array__"):
        return _ext(np.asarray(node))
    return node


def _packed(node):
    if isinstance(node, dict):
        return {k: _packed(v) for k, v in node.items()}
    return None if node is None else np.packbits(np.asarray(node) != 0)


def test_packed_flax_masks_read_as_the_unpacked_ones(tmp_path):
    run = tmp_path / "packed"
    run.mkdir()
    for path in sorted((FIXTURES / "flax" / "imp-mlp").iterdir()):
        tree = msgpack_file.load(path)
        tree["opt_state"]["masks"] = _packed(tree["opt_state"]["masks"])
        (run / path.name).write_bytes(msgpack.packb(_encode(tree), use_bin_type=True))
    packed = analyze(run, tmp_path / "a")
    plain = analyze(FIXTURES / "flax" / "imp-mlp", tmp_path / "b")
    for name in ("rounds", "steps", "eigen", "survival"):
        assert packed[name].drop("run").equals(plain[name].drop("run"))
    assert "packed masks" in packed["runs"]["notes"][0]


def test_packed_orbax_masks_read_as_the_unpacked_ones(tmp_path):
    from test_orbax import hand_made

    rng = np.random.default_rng(0)
    weights = {"params.dense.kernel": rng.normal(size=(13, 7)).astype(np.float32),
               "params.out.kernel": rng.normal(size=(7, 3)).astype(np.float32)}
    plain_root, packed_root = tmp_path / "plain", tmp_path / "packed"
    keep = {k: np.ones(v.shape, bool) for k, v in weights.items()}
    for step in range(3):
        plain = {**weights, **{k.replace("params", "opt_state.masks"): m.astype(np.uint8) for k, m in keep.items()}}
        packed = {**weights, **{k.replace("params", "opt_state.masks"): np.packbits(m) for k, m in keep.items()}}
        hand_made(plain_root, step, plain)
        hand_made(packed_root, step, packed)
        keep = {k: m & (rng.random(m.shape) > 0.3) for k, m in keep.items()}
    a, b = analyze(plain_root, tmp_path / "a"), analyze(packed_root, tmp_path / "b")
    assert a["rounds"]["n_unpruned"].to_list() == b["rounds"]["n_unpruned"].to_list()
    assert a["rounds"]["abs_sum"].to_list() == b["rounds"]["abs_sum"].to_list()
    assert "packed masks" in b["runs"]["notes"][0]


def test_packed_mask_with_padding_bits_follows_numpy(tmp_path):
    from flowscan.readers import names

    weight = np.arange(1, 11, dtype=np.float32).reshape(2, 5)     # n = 10: two bytes, six padding bits
    mask = np.array([1, 0, 1, 1, 0, 0, 1, 1, 1, 0], np.uint8)
    packed = np.packbits(mask)
    assert names.is_packed_mask(packed, weight)
    np.testing.assert_array_equal(np.asarray(names.unpacked(packed, weight)), mask.reshape(2, 5))
    assert not names.is_packed_mask(np.ones(3, np.uint8), weight)          # wrong length: a shape error
    assert not names.is_packed_mask(packed.astype(np.int8), weight)


# -- 6 and the rest: run names, incomplete last rounds, never-pruned tensors ---------------------
def test_truncated_last_round_is_being_written_not_a_failed_run(tmp_path, copy_fixture):
    run = copy_fixture("closed-form/safetensors", "run")
    full = analyze(run, tmp_path / "full", *CLOSED)
    last = run / "round_4.safetensors"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    result = run_cli("analyze", run, "-o", tmp_path / "out", *CLOSED)
    frames = read_tables(tmp_path / "out")
    row = _runs(frames)["run"]
    assert row["status"] == "ok" and row["incomplete_rounds"] == [4] and row["complete_rounds"] == [0, 1, 2, 3]
    assert str(last) in result.stderr and "round 4 is incomplete" in result.stderr
    assert frames["rounds"].equals(full["rounds"].filter(pl.col("round") < 4))


def test_truncated_earlier_round_stays_the_runs_error(tmp_path, copy_fixture):
    run = copy_fixture("closed-form/safetensors", "run")
    middle = run / "round_2.safetensors"
    middle.write_bytes(middle.read_bytes()[:100])
    run_cli("analyze", run, "-o", tmp_path / "out", *CLOSED, expect=1)
    row = _runs(read_tables(tmp_path / "out"))["run"]
    assert row["status"] == "error" and str(middle) in row["error"]


def test_last_round_lacking_a_prunable_tensor_is_incomplete(tmp_path, copy_fixture):
    run = copy_fixture("closed-form/safetensors", "run")
    last = run / "round_4.safetensors"
    arrays = load_file(str(last))
    dropped = sorted(k for k in arrays if k.startswith("b."))
    save_file({k: v for k, v in arrays.items() if not k.startswith("b.")}, str(last))
    frames = analyze(run, tmp_path / "out", *CLOSED)
    row = _runs(frames)["run"]
    assert row["incomplete_rounds"] == [4] and "lacks" in row["notes"] and dropped


def test_inspect_shows_complete_missing_and_being_written(tmp_path, copy_fixture):
    run = copy_fixture("closed-form/flowscan", "run")
    rounds = sorted(p for p in run.iterdir() if p.is_dir())
    shutil.rmtree(rounds[1])                                   # a gap
    (rounds[-1] / "round.json").unlink()                       # the last still being written
    result = run_cli("inspect", run)
    assert "rounds: complete 0, 2, 3; missing 1; being written 4" in result.stdout
    assert "(being written)" in result.stdout
    assert "warning: run run: round 4 is incomplete" in result.stderr
    data = json.loads(run_cli("inspect", run, "--json").stdout)[0]
    assert (data["complete_rounds"], data["missing_rounds"], data["incomplete_rounds"]) == ([0, 2, 3], [1], [4])


def test_never_pruned_tensor_is_named_and_marked(tmp_path):
    run = tmp_path / "replicate_1"
    shutil.copytree(OPENLTH / "replicate_1", run)
    for mask_file in run.glob("level_*/main/mask.pth"):
        masks = torch.load(mask_file, weights_only=True)
        masks["fc.weight"] = torch.ones_like(masks["fc.weight"])   # pruning_layers_to_ignore
        torch.save(masks, mask_file)
    result = run_cli("analyze", run, "-o", tmp_path / "out")
    frames = read_tables(tmp_path / "out")
    row = frames["runs"].row(0, named=True)
    assert row["never_pruned"] == ["fc.weight"] and "never pruned" in row["notes"]
    eigen = frames["eigen"].filter(quantity="M")
    shares = dict(zip(eigen["block"], eigen["never_pruned_share"]))
    fc_size = math.prod(torch.load(run / "level_0" / "main" / "mask.pth", weights_only=True)["fc.weight"].shape)
    fc_block = next(b for b in shares if shares[b] > 0)
    fc_params = frames["rounds"].filter(block=fc_block, round=0)["n_params"][0]
    assert shares[fc_block] == pytest.approx(fc_size / fc_params)
    assert all(v == 0 for b, v in shares.items() if b != fc_block)
    # the whole block is never pruned: that is its verdict, for M and P alike, never "relevant"
    assert "never_pruned: fc" in result.stdout
    verdicts = frames["eigen"].filter(block=fc_block)["relevance"].to_list()
    assert verdicts == ["never_pruned", "never_pruned"]


def test_python_api_names_a_run_given_as_path(tmp_path):
    results = pipeline.analyze(FIXTURES / "closed-form" / "npz")
    assert [r.run.name for r in results] == ["npz"]
    assert tables.build_tables(results)["runs"]["run"].to_list() == ["npz"]
    assert math.isfinite(results[0].eigen["M"].sigma_mean[0])


# -- watching a run in progress ------------------------------------------------------------------
class Watcher:
    """`flowscan analyze PATH -o OUT --watch` in a subprocess; ended by SIGINT (Ctrl-C) on leaving."""

    def __init__(self, path, out, *args):
        import os
        import subprocess
        import sys

        self.out = out
        self.proc = subprocess.Popen([sys.executable, "-m", "flowscan", "analyze", str(path), "-o", str(out),
                                      "--watch", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.stdout = self.stderr = ""

    def until(self, done, seconds: float = 120) -> None:
        """Wait until `done()` holds, failing if the watcher died or time ran out."""
        import time

        deadline = time.time() + seconds
        while not done():
            assert time.time() < deadline and self.proc.poll() is None, "the watcher did not get there"
            time.sleep(0.05)

    def rounds_written(self) -> set:
        # one open and one read: polars reads a path in several opens, and the watcher may rename a
        # new table over it between two of them (the tables are replaced atomically, not in place)
        path = self.out / "rounds.parquet"
        return set(pl.read_parquet(io.BytesIO(path.read_bytes()))["round"]) if path.exists() else set()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        import signal

        self.proc.send_signal(signal.SIGINT)
        self.stdout, self.stderr = self.proc.communicate(timeout=60)


def test_watch_follows_produce_and_ends_with_130_on_ctrl_c(tmp_path):
    import subprocess
    import sys

    ckpts, out = tmp_path / "ckpts", tmp_path / "out"
    ckpts.mkdir()
    with Watcher(ckpts, out, "--interval", "0.3") as watcher:
        subprocess.run([sys.executable, "-m", "flowscan", "produce", "--model", "mlp", "--data", "digits",
                        "--epochs", "2", "--batch-size", "64", "--lr", "0.05", "-q", "--rounds", "3",
                        "-o", str(ckpts)], check=True, capture_output=True)
        made = set(range(len(list((ckpts / "seed_0").glob("round_*")))))
        assert len(made) >= 3
        watcher.until(lambda: watcher.rounds_written() == made)   # a scan has seen the finished archive
    assert watcher.proc.returncode == 130, watcher.stderr
    assert "stopped watching" in watcher.stderr
    frames = read_tables(out)
    assert frames["runs"]["complete_rounds"][0].to_list() == sorted(made)
    assert frames["runs"]["status"].to_list() == ["ok"]
    assert frames["eigen"].equals(analyze(ckpts, tmp_path / "again")["eigen"])   # a plain analysis' tables
    assert "run seed_0  [flowscan" in watcher.stdout   # the summary of its first complete scan


def test_watch_reports_a_round_that_arrives(tmp_path):
    import time

    run = tmp_path / "ckpts" / "seed_0"
    shutil.copytree(FIXTURES / "closed-form" / "flowscan", run)
    (run / "round_0004").rename(run / "later")          # round 4 arrives once the watcher runs
    with Watcher(tmp_path / "ckpts", tmp_path / "out", "--interval", "0.2", *CLOSED) as watcher:
        watcher.until(lambda: watcher.rounds_written() == {0, 1, 2, 3})
        (run / "later").rename(run / "round_0004")     # atomically, as produce writes a round
        watcher.until(lambda: watcher.rounds_written() == {0, 1, 2, 3, 4})
        time.sleep(1.0)   # the change lines are printed just after the tables are written
    assert watcher.proc.returncode == 130, watcher.stderr
    assert "run seed_0: new round(s) 4" in watcher.stdout
    assert "run seed_0: sigma((other))" in watcher.stdout   # its sigma moved with the new round


def test_watch_changes_lists_new_rounds_moved_sigmas_and_verdicts():
    from flowscan import watch

    run = FIXTURES / "closed-form" / "safetensors"
    from flowscan.blocks import BlockRules

    opts = pipeline.Options(blocks=BlockRules.parse([r"^(a|b)\."]))
    runs = pipeline.find_runs(run, opts)
    full = pipeline.analyze_runs(runs, opts)
    short_runs = pipeline.find_runs(run, opts)
    short_runs[0].rounds = short_runs[0].rounds[:2]          # one step: undetermined verdicts
    short = pipeline.analyze_runs(short_runs, opts)
    lines = watch.changes(short, full)
    assert "run safetensors: new round(s) 2, 3, 4" in lines
    assert "run safetensors: a undetermined -> relevant" in lines
    assert any(line.startswith("run safetensors: sigma((other))") for line in lines)
    assert watch.changes(full, full) == []


def test_a_missing_step_numbered_checkpoint_is_a_missing_round(tmp_path):
    run = tmp_path / "imp"
    shutil.copytree(FIXTURES / "flax" / "imp-mlp", run)   # checkpoint_150, _300, _450, _600
    (run / "checkpoint_450").unlink()
    frames = analyze(run, tmp_path / "out")
    row = _runs(frames)["imp"]
    assert row["complete_rounds"] == [0, 1, 3] and row["missing_rounds"] == [2]
    full = analyze(FIXTURES / "flax" / "imp-mlp", tmp_path / "full")
    for r in (0, 1, 3):   # the rounds that are there keep their numbers and their sums
        assert frames["rounds"].filter(round=r).drop("run").equals(full["rounds"].filter(round=r).drop("run"))


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT while inherited as ignored"])
def test_a_watcher_stops_cleanly_on_a_scripts_signal(tmp_path, how):
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "ckpts" / "seed_0"
    shutil.copytree(FIXTURES / "closed-form" / "flowscan", run)
    out = tmp_path / "out"
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if "ignored" in how else None
    proc = subprocess.Popen([sys.executable, "-m", "flowscan", "analyze", str(tmp_path / "ckpts"), "-o", str(out),
                             "--watch", "--interval", "0.2", *CLOSED], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=ignore)   # as `flowscan ... &` in a script
    deadline = time.time() + 120
    while not (out / "rounds.parquet").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM if how == "SIGTERM" else signal.SIGINT)
    _stdout, stderr = proc.communicate(timeout=60)
    expected = signal.SIGTERM if how == "SIGTERM" else signal.SIGINT
    assert proc.returncode == 128 + expected, stderr
    assert f"stopped watching ({expected.name}); the tables in {out}" in stderr
    assert read_tables(out)["runs"]["status"].to_list() == ["ok"]   # intact
