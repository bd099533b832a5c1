"""Rounds parsed by a third-party library (h5py, tensorstore, msgpack) are read in watched worker
processes: a read that never returns (libhdf5 looping on a damaged file, with the GIL held) or a
crash in the library is that round's named error, and every other round and run is analysed."""

from __future__ import annotations

import shutil
import time

import polars as pl

import crashing_reducer
import fuzzing
from conftest import FIXTURES, run_cli
from flowscan import engines, pipeline, watchdog
from flowscan.readers.base import Round


def test_a_hung_and_a_crashed_round_cost_only_themselves(tmp_path):
    tasks = [(i, Round(i, "keras", (tmp_path / f"{i}.h5",))) for i in range(5)]
    options = pipeline.Options(jobs=2, read_timeout=2.0)
    started = time.monotonic()
    outcomes = dict(engines.map_rounds(tasks, options, None, crashing_reducer.reduce_hang_or_die))
    assert time.monotonic() - started < 60
    assert {i: outcomes[i] for i in (0, 3, 4)} == {0: "reduced 0", 3: "reduced 3", 4: "reduced 4"}
    assert outcomes[1].startswith(f"{tmp_path / '1.h5'}: reading this round did not finish within 2 s")
    assert outcomes[2].startswith(f"{tmp_path / '2.h5'}: the process reading this round died")


def test_workers_are_reused_and_a_killed_one_is_not(tmp_path):
    watchdog._stop_idle()
    tasks = [(i, Round(i, "keras", (tmp_path / f"{i}.h5",))) for i in (0, 3)]
    list(engines.map_rounds(tasks, pipeline.Options(jobs=1), None, crashing_reducer.reduce_or_die))
    [worker] = watchdog._idle
    list(engines.map_rounds(tasks, pipeline.Options(jobs=1), None, crashing_reducer.reduce_or_die))
    assert watchdog._idle == [worker]   # the same process served the second analysis
    list(engines.map_rounds([(2, Round(2, "keras", ()))], pipeline.Options(jobs=1), None,
                            crashing_reducer.reduce_or_die))
    assert watchdog._idle == []


def test_rounds_of_formats_read_without_a_library_stay_in_the_engine(tmp_path):
    # an unwatched round that would hang is never sent to a worker: it is the engine's (here: not run)
    tasks = [(i, Round(i, "safetensors", (tmp_path / f"{i}.st",))) for i in (0, 3)]
    assert dict(engines.map_rounds(tasks, pipeline.Options(jobs=1), None, crashing_reducer.reduce_or_die)) == \
        {0: "reduced 0", 3: "reduced 3"}
    assert not [t for t in tasks if engines._parsed_by_a_library(t[1])]
    assert engines._parsed_by_a_library(Round(0, "orbax", ())) and engines._parsed_by_a_library(Round(0, "flax", ()))


def test_a_keras_file_that_makes_libhdf5_loop_forever_is_a_named_error(tmp_path):
    # fuzz case keras-h5 200123: one changed byte, and libhdf5 never returns from the root attribute
    seeds = fuzzing.prepare(tmp_path / "fuzz")
    fuzzing.make_case(seeds["keras-h5"], tmp_path / "runs" / "looping", "keras-h5", 200123)
    shutil.copytree(FIXTURES / "keras" / "closed-form-h5", tmp_path / "runs" / "good")
    result = run_cli("analyze", tmp_path / "runs", "-o", tmp_path / "out", "-q", "--no-cache",
                     "--read-timeout", "3", expect=1)
    runs = {r["run"]: r for r in pl.read_parquet(tmp_path / "out" / "runs.parquet").iter_rows(named=True)}
    assert runs["good"]["status"] == "ok"
    assert runs["looping"]["status"] == "error"
    assert "round_1.h5: reading this round did not finish within 3 s" in runs["looping"]["error"]
    assert "Traceback" not in result.output
