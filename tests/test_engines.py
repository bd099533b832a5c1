"""The map step's engines give the same tables: serial, threads, processes and a dask cluster,
on every bundled fixture (different readers, failed runs included)."""

from __future__ import annotations

import pytest
from polars.testing import assert_frame_equal

from conftest import FIXTURES, analyze
from flowscan import engines, pipeline
from flowscan.readers.base import Round

# every fixture at once: several readers, runs with errors and notes
ENGINE_ARGS = {
    "serial": ["--jobs", "1"],
    "threads": ["--jobs", "3", "--engine", "threads"],
    "processes": ["--jobs", "2", "--engine", "processes"],
}


def _same_tables(a: dict, b: dict) -> None:
    for name in a:
        keys = [c for c in ("run", "block", "quantity", "round", "name") if c in a[name].columns]
        assert_frame_equal(a[name].sort(keys), b[name].sort(keys), check_exact=True)


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    return analyze(FIXTURES, tmp_path_factory.mktemp("serial"), "--no-cache", *ENGINE_ARGS["serial"], expect=None)


@pytest.mark.parametrize("engine", ["threads", "processes"])
def test_local_engines_match_serial(engine, serial, tmp_path):
    _same_tables(serial, analyze(FIXTURES, tmp_path, "--no-cache", *ENGINE_ARGS[engine], expect=None))


def test_threads_sharing_every_round_in_parts_match_serial(serial, tmp_path, monkeypatch):
    """Every local round cut into one part per job (three), reduced side by side and merged: the same
    tables as one job, to the bit, failed runs and their messages included."""
    monkeypatch.setattr(pipeline, "PART_BYTES", 1)
    monkeypatch.setattr(pipeline, "ROUNDS_PER_JOB", 1000)   # as if there were few rounds
    cut = []
    real = pipeline._parts
    monkeypatch.setattr(pipeline, "_parts", lambda rnd, options, wanted: cut.append(real(rnd, options, wanted)) or cut[-1])
    _same_tables(serial, analyze(FIXTURES, tmp_path, "--no-cache", *ENGINE_ARGS["threads"], expect=None))
    assert cut.count(3) > 20 and 1 in cut   # parts where flowscan reads the files; h5/msgpack rounds whole


def test_rounds_are_cut_in_parts_only_when_too_few_to_keep_the_jobs_busy(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "PART_BYTES", 10)
    files = []
    for i in range(16):
        files.append(tmp_path / f"{i}.safetensors")
        files[-1].write_bytes(b"x" * 40)   # room for 4 parts
    seen = {}

    def parts_of(n_rounds: int, jobs: int) -> list[int]:
        tasks = [((0, i), Round(i, "safetensors", (files[i],))) for i in range(n_rounds)]
        real = pipeline._parts
        monkeypatch.setattr(pipeline, "_parts", lambda rnd, options, wanted: seen.setdefault(
            (n_rounds, jobs, rnd.index), real(rnd, options, wanted)))
        list(pipeline._in_parts(tasks, pipeline.Options(jobs=jobs), None, lambda rnd, names, verify: "x"))
        monkeypatch.setattr(pipeline, "_parts", real)
        return [seen[(n_rounds, jobs, i)] for i in range(n_rounds)]

    assert parts_of(1, 2) == [2]           # one round, two jobs: a part each
    assert parts_of(3, 2) == [2, 2, 2]
    assert parts_of(8, 2) == [1] * 8       # four rounds a job: whole rounds
    assert parts_of(2, 3) == [3, 3]        # at most a part per job ...
    assert parts_of(1, 8) == [4]           # ... and per PART_BYTES


def test_tensors_are_cut_into_consecutive_parts_of_about_equal_size():
    import numpy as np

    from flowscan.readers.base import TensorRef
    from flowscan.reduce import part_of

    rng = np.random.default_rng(2)
    for _ in range(200):
        refs = [TensorRef(f"t{i}", np.empty(int(rng.integers(0, 1000))), None if rng.random() < 0.3 else object(), "x")
                for i in range(rng.integers(0, 12))]
        parts = int(rng.integers(1, 5))
        cut = [part_of(refs, k, parts) for k in range(parts)]
        assert [r.name for part in cut for r in part] == [r.name for r in refs]   # each once, in order
        sizes = [sum(r.shape[0] * (2 if r.mask is not None else 1) for r in part) for part in cut]
        largest = max((r.shape[0] * (2 if r.mask is not None else 1) for r in refs), default=0)
        assert all(size <= sum(sizes) / parts + largest for size in sizes)


def test_a_round_in_parts_fails_with_its_first_failing_part_and_counts_once_in_progress(tmp_path, monkeypatch):
    from flowscan.reduce import RoundSums

    monkeypatch.setattr(pipeline, "PART_BYTES", 1)
    rounds = [Round(i, "safetensors", (tmp_path / f"{i}.safetensors",)) for i in range(3)]   # 3 < 4 a job
    for rnd in rounds:
        rnd.files[0].write_bytes(b"x" * 10)

    def reduce_task(rnd, names, verify):
        k, parts = rnd.part
        if rnd.index == 1 and k > 0:
            return pipeline.RoundError(f"part {k} of {parts} broken")
        return RoundSums(rnd.index, {f"t{k}": k}, {"m": 1.0}, {}, ("note",))

    steps = []
    options = pipeline.Options(jobs=3, verify=False)
    outcomes = dict(pipeline._reduce_all([((0, r.index), r) for r in rounds], options, steps.append, reduce_task))
    assert len(steps) == 3
    assert str(outcomes[(0, 1)]) == "part 1 of 3 broken"
    assert list(outcomes[(0, 0)].tensors) == ["t0", "t1", "t2"] and outcomes[(0, 2)].notes == ("note",)


def test_dask_local_cluster_matches_serial(serial, tmp_path):
    pytest.importorskip("distributed")
    tables = analyze(FIXTURES, tmp_path, "--engine", "dask", "--jobs", "2", expect=None)
    _same_tables(serial, tables)
    # the per-round cache was written (by this process, from the workers' results); a second pass reads it
    assert any((tmp_path / ".cache").glob("*.log"))
    _same_tables(serial, analyze(FIXTURES, tmp_path, "--engine", "dask", "--jobs", "2", expect=None))


def test_threads_cover_every_task_once_and_report_errors_as_messages(tmp_path):
    def reduce_task(rnd, names, verify):
        if rnd.index == 3:
            return f"{rnd.files[0]}: broken"
        return f"reduced {rnd.index}"
    tasks = [(i % 3, Round(i, "x", (tmp_path / f"{i}.pt",))) for i in range(20)]
    steps = []
    outcomes = list(engines.map_rounds(tasks, pipeline.Options(jobs=4), steps.append, reduce_task))
    assert sorted(o for _run, o in outcomes if o.startswith("reduced")) == sorted(
        f"reduced {i}" for i in range(20) if i != 3)
    assert [(run, o) for run, o in outcomes if "broken" in o] == [(0, f"{tmp_path / '3.pt'}: broken")]
    assert len(steps) == 20


def test_threads_hand_the_gil_over_sooner_while_they_run_and_restore_it(tmp_path):
    import sys

    seen = []

    def reduce_task(rnd, names, verify):
        seen.append(sys.getswitchinterval())
        return "ok"
    before = sys.getswitchinterval()
    tasks = [(0, Round(i, "x", (tmp_path / f"{i}.pt",))) for i in range(6)]
    assert len(list(engines.map_rounds(tasks, pipeline.Options(jobs=2), None, reduce_task))) == 6
    assert seen and max(seen) <= engines.GIL_TURN_SECONDS < before
    assert sys.getswitchinterval() == before
    # and after an error in the pool too
    def failing(rnd, names, verify):
        raise RuntimeError("worker bug")
    with pytest.raises(RuntimeError):
        list(engines.map_rounds(tasks, pipeline.Options(jobs=2), None, failing))
    assert sys.getswitchinterval() == before


def test_unknown_engine_and_unreachable_scheduler_are_named_errors(tmp_path, monkeypatch):
    from flowscan.errors import FlowscanError

    monkeypatch.setattr(engines, "CONNECT_TIMEOUT", "1s")
    tasks = [(0, Round(0, "x", (tmp_path / "0.pt",)))]
    with pytest.raises(FlowscanError, match="unknown engine 'gpu'"):
        list(engines.map_rounds(tasks, pipeline.Options(engine="gpu"), None, lambda *a: None))
    pytest.importorskip("distributed")
    with pytest.raises(FlowscanError, match="cannot connect"):
        list(engines.map_rounds(tasks, pipeline.Options(engine="dask", scheduler="tcp://127.0.0.1:9"), None,
                                lambda *a: None))


def test_default_jobs_is_the_usable_cores():
    import os

    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert engines.default_jobs() == expected


def test_rounds_sent_to_a_remote_scheduler_carry_absolute_paths(tmp_path, monkeypatch):
    """Remote dask workers have another working folder: files and the paths a reader keeps in its
    spec (Orbax's item folders) become absolute; other spec values and store URLs stay as they are."""
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    rnd = Round(0, "orbax", (Path("run/7/_METADATA"),), spec=(Path("run/7"), 3))
    sent = engines._absolute(rnd)
    assert sent.files == (tmp_path / "run/7/_METADATA",) and sent.spec == (tmp_path / "run/7", 3)


@pytest.mark.parametrize("engine", ["threads", "processes"])
def test_inspect_reads_headers_with_every_local_engine_as_serially(engine, tmp_path):
    import shutil

    shutil.copytree(FIXTURES, tmp_path / "all")
    broken = tmp_path / "all" / "torch-prune" / "seed0" / "1checkpoint.pth.tar"
    broken.write_bytes(broken.read_bytes()[:200])   # a round cut short in one run
    serial = pipeline.inspect_runs(pipeline.find_runs(tmp_path / "all"), pipeline.Options(jobs=1))
    parallel = pipeline.inspect_runs(pipeline.find_runs(tmp_path / "all"), pipeline.Options(jobs=2, engine=engine))
    assert [(i.run.name, i.error, i.prunable, i.labels, i.mask_source) for i in parallel] == \
        [(i.run.name, i.error, i.prunable, i.labels, i.mask_source) for i in serial]
    assert sum(bool(i.error) for i in serial) >= 1 and any(not i.error for i in serial)   # both kinds compared
    assert any(str(broken) in (i.error or "") for i in serial)


def test_the_process_pool_starts_during_discovery_and_is_closed_when_not_wanted(tmp_path, monkeypatch):
    """`foresee` starts the pool while discovery goes on: at once for --engine processes, for auto once
    its rule holds for the rounds found; a pool the final choice does not want is closed unused."""
    small = [Round(i, "prune-style", (tmp_path / f"{i}.pt",)) for i in range(engines.AUTO_PROCESSES_ROUNDS)]
    for rnd in small:
        rnd.files[0].write_bytes(b"x" * 100)
    try:
        assert not engines.foresee(10, small[:10], pipeline.Options(jobs=2, engine="auto"))
        assert engines._early is None                              # too few rounds to tell yet
        assert engines.foresee(len(small), small, pipeline.Options(jobs=2, engine="auto"))
        assert engines._early[0] == 2
        pool = engines._early[1]
        assert engines._early_pool(3) is None and engines._early is None   # another size: closed
        with pytest.raises(RuntimeError):
            pool.submit(int)
        engines.foresee(1, small[:1], pipeline.Options(jobs=2, engine="processes"))
        assert engines._early[0] == 2
        pool = engines._early[1]
        list(engines.map_rounds([(0, small[0])], pipeline.Options(jobs=2, engine="threads"), None,
                                lambda rnd, names, verify: "done"))
        assert engines._early is None                              # threads chosen: closed
        with pytest.raises(RuntimeError):
            pool.submit(int)
        assert engines.foresee(1, small[:1], pipeline.Options(jobs=1, engine="processes"))
        assert engines._early is None                              # one job: no pool
        large = [Round(i, "prune-style", (tmp_path / "large.pt",)) for i in range(len(small))]
        (tmp_path / "large.pt").write_bytes(b"x" * (engines.AUTO_PROCESSES_MEAN_BYTES + 1))
        assert engines.foresee(len(large), large, pipeline.Options(jobs=2, engine="auto"))
        assert engines._early is None                              # large rounds: threads, settled
    finally:
        engines.discard_early_pool()


def test_an_early_pool_reduces_the_rounds_of_a_processes_scan(tmp_path, monkeypatch):
    started = []
    real = engines._early_pool
    monkeypatch.setattr(engines, "_early_pool", lambda jobs: started.append(pool := real(jobs)) or pool)
    tables = analyze(FIXTURES / "closed-form", tmp_path, "--no-cache", "--jobs", "2", "--engine", "processes")
    assert started and started[0] is not None
    assert tables["runs"]["status"].to_list() == ["ok"] * 4


def test_the_python_entry_point_takes_auto_as_the_cli_does(serial):
    """`flowscan.analyze(..., engine="auto")` decides the engine for the runs found, as the CLI's default
    does, instead of refusing the name."""
    import flowscan

    frames = flowscan.analyze(FIXTURES, engine="auto", jobs=2)
    assert_frame_equal(frames["eigen"].sort("run", "block", "quantity"),
                       serial["eigen"].sort("run", "block", "quantity"), check_exact=True)
    assert flowscan.inspect(FIXTURES, engine="auto", jobs=2)["tensors"].height > 0
