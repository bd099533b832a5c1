"""The hostile-file corpus (tests/hostile.py) planted beside a good run: nothing runs, nothing
crashes, each bad file is a named error of its own run, and the good run's tables are exactly
those of analysing it alone, so nothing a hostile file did survived it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

import hostile
from conftest import FIXTURES, read_tables

GOOD = "zz_good"  # analysed after every bad run


def _analyze(root: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    # a subprocess, so that a crash (segfault) fails this test instead of killing pytest
    return subprocess.run([sys.executable, "-m", "flowscan", "analyze", str(root), "-o", str(out), "-q",
                           "--no-cache", "--verify", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONFAULTHANDLER": "1"})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    canary = root.parent / f"{root.name}-CANARY"
    files = hostile.corpus(root / "runs", canary)
    shutil.copytree(FIXTURES / "closed-form" / "prune-style", root / "runs" / GOOD)
    shutil.copytree(FIXTURES / "closed-form" / "prune-style", root / "alone" / GOOD)
    alone = _analyze(root / "alone", root / "alone-out")
    assert alone.returncode == 0, alone.stderr
    result = _analyze(root / "runs", root / "out")
    return root, canary, files, result


def test_corpus_is_large_and_varied(corpus):
    _root, _canary, files, _result = corpus
    assert len(hostile.kind_names()) >= 40
    assert len(files) >= 4 * 40


def test_nothing_ran_and_nothing_crashed(corpus):
    _root, canary, _files, result = corpus
    assert not canary.exists()
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])  # not a signal, not 0


def test_every_bad_file_is_a_named_error_of_its_own_run(corpus):
    root, _canary, files, result = corpus
    runs = {r["run"]: r for r in pl.read_parquet(root / "out" / "runs.parquet").iter_rows(named=True)}
    wrong = {name: runs[name]["status"] for name in files if runs[name]["status"] != "error"}
    assert not wrong, wrong
    unnamed = {name: runs[name]["error"] for name, bad in files.items() if str(bad) not in runs[name]["error"]}
    assert not unnamed, unnamed
    generic = {name: runs[name]["error"] for name in files
               if any(word in runs[name]["error"] for word in ("Traceback", "KeyError", "IndexError"))}
    assert not generic, generic
    assert f"error: run {next(iter(files))}: " in result.stderr


def test_hostile_globals_are_named(corpus):
    root, _canary, files, _result = corpus
    errors = dict(pl.read_parquet(root / "out" / "runs.parquet").select("run", "error").iter_rows())
    kinds = hostile.kind_names()
    for name in files:
        kind = kinds[int(name.split("_")[1])]
        if kind in ("os.system", "subprocess.Popen", "functools.partial", "torch.hub.load"):
            assert f"names {kind}" in errors[name] and "nothing was executed" in errors[name], errors[name]


def test_good_run_is_untouched(corpus):
    root, _canary, _files, _result = corpus
    mixed, alone = read_tables(root / "out"), read_tables(root / "alone-out")
    for table in ("rounds", "steps", "eigen", "survival"):
        got = mixed[table].filter(pl.col("run") == GOOD)
        assert got.height > 0
        assert got.equals(alone[table]), table
    assert mixed["runs"].filter(pl.col("run") == GOOD)["status"].to_list() == ["ok"]
