"""The per-round cache: exact round trips, damaged entries recomputed, resume after kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import FIXTURES, analyze
from flowscan import pipeline
from flowscan.io import round_cache


@pytest.fixture
def one_round():
    run = pipeline.find_runs(FIXTURES / "closed-form" / "safetensors")[0]
    return pipeline._reduce_task(run.rounds[2], pipeline.Options().names)


def _same(back, sums):
    assert back == sums   # sums, metrics and notes
    assert back.bits.keys() == sums.bits.keys()
    for name, bits in sums.bits.items():
        np.testing.assert_array_equal(back.bits[name], bits)


def test_round_trip_is_exact_in_this_session_and_the_next(tmp_path, one_round):
    with round_cache.RoundCache(tmp_path) as cache:
        cache.put("a", one_round)
        cache.put("b", replace(one_round, index=7))
        _same(cache.get("a"), one_round)
    again = round_cache.RoundCache(tmp_path)
    _same(again.get("a"), one_round)
    assert again.get("b").index == 7 and again.get("c") is None
    assert len(list(tmp_path.iterdir())) == 1   # one log for the session, no temporary file


def _log_with_two_records(folder, one_round):
    with round_cache.RoundCache(folder) as cache:
        cache.put("first", one_round)
        cache.put("second", one_round)
    (log,) = folder.glob("*.log")
    return log, log.read_bytes()


@pytest.mark.parametrize("damage", ["cut short", "bit flip", "magic", "length", "empty"])
def test_a_damaged_last_record_is_recomputed_and_the_first_kept(tmp_path, one_round, damage):
    log, data = _log_with_two_records(tmp_path, one_round)
    second = data.index(b"FSR2", 4)
    data = {"cut short": data[:-3],
            "bit flip": data[:-5] + bytes([data[-5] ^ 1]) + data[-4:],
            "magic": data[:second] + b"XXXX" + data[second + 4:],
            "length": data[:second + 8] + (1 << 40).to_bytes(8, "little") + data[second + 16:],
            "empty": data[:second]}[damage]
    log.write_bytes(data)
    cache = round_cache.RoundCache(tmp_path)
    _same(cache.get("first"), one_round)
    assert cache.get("second") is None


def test_a_record_damaged_in_the_middle_is_not_trusted(tmp_path, one_round):
    log, data = _log_with_two_records(tmp_path, one_round)
    log.write_bytes(data[:40] + bytes([data[40] ^ 0xFF]) + data[41:])
    cache = round_cache.RoundCache(tmp_path)
    assert cache.get("first") is None   # its CRC-32 fails
    _same(cache.get("second"), one_round)


def test_many_settled_logs_are_merged_into_one_that_keeps_every_round(tmp_path, one_round):
    n = round_cache.MAX_LOGS + 2
    for k in range(n):
        with round_cache.RoundCache(tmp_path) as cache:
            cache.put(f"k{k}", replace(one_round, index=k))
    recent = round_cache.RoundCache(tmp_path)   # just written: maybe another analysis's open logs
    assert len(list(tmp_path.glob("*.log"))) == n and len(recent) == n
    old = time.time() - 2 * round_cache.SETTLED_SECONDS
    for log in tmp_path.glob("*.log"):
        os.utime(log, (old, old))
    cache = round_cache.RoundCache(tmp_path)
    logs = list(tmp_path.glob("*.log"))
    assert len(logs) == 1 and logs[0].name.endswith("-merged.log")
    assert [cache.get(f"k{k}").index for k in range(n)] == list(range(n))
    assert [round_cache.RoundCache(tmp_path).get(f"k{k}").index for k in range(n)] == list(range(n))
    assert not list(tmp_path.glob("*.tmp"))


def test_a_second_analysis_reads_every_round_from_the_cache(tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = analyze(FIXTURES / "closed-form", out)
    monkeypatch.setattr(pipeline, "reduce_round", lambda *a: pytest.fail("a cached round was reduced again"))
    second = analyze(FIXTURES / "closed-form", out)
    for name in ("rounds", "steps", "eigen", "survival"):
        assert second[name].equals(first[name]), name


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
    while _cached(out) < 5:
        assert proc.poll() is None and time.time() < deadline, "analysis ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    cached = _cached(out)
    assert 5 <= cached < 40
    resumed = analyze(run, out)
    fresh = analyze(run, tmp_path / "fresh", "--no-cache")
    for name in ("rounds", "steps", "eigen", "survival"):
        assert resumed[name].equals(fresh[name]), name
    assert _cached(out) == 40


def _cached(out):
    """Rounds the cache of an output folder holds now."""
    return len(round_cache.RoundCache(out / ".cache")) if (out / ".cache").exists() else 0


def test_a_round_whose_cache_key_fails_is_still_reduced(tmp_path, monkeypatch):
    def broken(rnd, names, verify):
        raise ValueError("the store answered nonsense")
    monkeypatch.setattr(pipeline, "_cache_key", broken)
    fresh = analyze(FIXTURES / "closed-form" / "safetensors", tmp_path / "fresh", "--no-cache")
    tables = analyze(FIXTURES / "closed-form" / "safetensors", tmp_path / "out")
    assert tables["rounds"].equals(fresh["rounds"])
    assert _cached(tmp_path / "out") == 0   # nothing cached under a key that could not be made
