"""The per-round cache: exact round trips, damaged entries recomputed, resume after kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import FIXTURES, analyze, read_tables
from flowscan import pipeline
from flowscan.io import round_cache


@pytest.fixture
def one_round():
    run = pipeline.find_runs(FIXTURES / "closed-form" / "safetensors")[0]
    return pipeline._reduce_task(run.rounds[2], pipeline.Options().names, None)


def test_round_trip_is_exact(tmp_path, one_round):
    path = tmp_path / "x.round"
    round_cache.store(path, one_round)
    back = round_cache.load(path)
    assert back == one_round   # sums, metrics and notes
    assert back.bits.keys() == one_round.bits.keys()
    for name, bits in one_round.bits.items():
        np.testing.assert_array_equal(back.bits[name], bits)
    assert [p.name for p in tmp_path.iterdir()] == ["x.round"]   # no temporary file left


@pytest.mark.parametrize("damage", ["truncated", "magic", "json", "extra bytes", "empty"])
def test_damaged_entries_are_recomputed_not_trusted(tmp_path, one_round, damage):
    path = tmp_path / "x.round"
    round_cache.store(path, one_round)
    data = path.read_bytes()
    data = {"truncated": data[:-3], "magic": b"XXXX" + data[4:], "json": data[:14] + b"{" + data[15:],
            "extra bytes": data + b"\0", "empty": b""}[damage]
    path.write_bytes(data)
    assert round_cache.load(path) is None


def test_kill_9_during_an_analysis_resumes_to_the_same_tables(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rng = np.random.default_rng(0)
    keep = np.ones((600, 600), bool)
    for n in range(40):
        save_file({"w": rng.normal(size=(600, 600)).astype(np.float32), "w_mask": keep.astype(np.uint8)},
                  str(run / f"round_{n}.safetensors"))
        keep &= rng.random(keep.shape) > 0.1
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "flowscan", "analyze", str(run), "-o", str(out), "-q", "-j", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list((out / ".cache").glob("*.round"))) < 5 if (out / ".cache").exists() else True:
        assert proc.poll() is None and time.time() < deadline, "analysis ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    cached = len(list((out / ".cache").glob("*.round")))
    assert 5 <= cached < 40
    resumed = analyze(run, out)
    fresh = analyze(run, tmp_path / "fresh", "--no-cache")
    for name in ("rounds", "steps", "eigen", "survival"):
        assert resumed[name].equals(fresh[name]), name
    assert len(list((out / ".cache").glob("*.round"))) == 40
