"""Bad input: clear errors naming the file and tensor; other runs still analysed; nothing executed."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from conftest import FIXTURES, analyze, read_tables, run_cli
from flowscan import engines, pipeline
from flowscan.errors import ScanError
from flowscan.tables import TABLES
from flowscan.readers.base import NameOptions


def _two_runs(tmp_path, copy_fixture) -> tuple[Path, Path, Path]:
    """A folder with a good run and a to-be-broken run (both the closed-form safetensors one)."""
    root = tmp_path / "runs"
    good = copy_fixture("closed-form/safetensors", "runs/good")
    bad = copy_fixture("closed-form/safetensors", "runs/bad")
    return root, good, bad


def _rewrite(path: Path, **changes) -> None:
    tensors = load_file(str(path))
    tensors.update(changes)
    save_file(tensors, str(path))


def _assert_one_failure(root: Path, out: Path, *fragments: str) -> str:
    result = run_cli("analyze", root, "-o", out, "-q", expect=1)
    tables = read_tables(out)
    runs = {r["run"]: r for r in tables["runs"].iter_rows(named=True)}
    assert runs["good"]["status"] == "ok"
    assert runs["bad"]["status"] == "error"
    assert set(tables["rounds"]["run"].unique()) == {"good"}  # the good run is fully analysed
    error = runs["bad"]["error"]
    for fragment in fragments:
        assert fragment in error
    assert f"error: run bad: {error}" in result.output
    return error


def test_truncated_file(tmp_path, copy_fixture):
    root, _good, bad = _two_runs(tmp_path, copy_fixture)
    target = bad / "round_2.safetensors"
    target.write_bytes(target.read_bytes()[:5000])
    _assert_one_failure(root, tmp_path / "out", str(target), "truncated")


def test_truncated_torch_checkpoint(tmp_path, copy_fixture):
    root = tmp_path / "runs"
    copy_fixture("closed-form/safetensors", "runs/good")
    bad = copy_fixture("closed-form/prune-style", "runs/bad")
    target = bad / "3checkpoint.pth.tar"
    target.write_bytes(target.read_bytes()[:20000])
    _assert_one_failure(root, tmp_path / "out", str(target), "truncated or corrupt")


def test_mask_that_is_not_zero_one(tmp_path, copy_fixture):
    root, _good, bad = _two_runs(tmp_path, copy_fixture)
    target = bad / "round_1.safetensors"
    mask = load_file(str(target))["b.1.weight_mask"].copy()
    mask[3, 4] = 2
    _rewrite(target, **{"b.1.weight_mask": mask})
    _assert_one_failure(root, tmp_path / "out", str(target), "'b.1.weight'", "not 0/1", "2")


def test_mask_shape_differs_from_weight(tmp_path, copy_fixture):
    root, _good, bad = _two_runs(tmp_path, copy_fixture)
    target = bad / "round_1.safetensors"
    _rewrite(target, **{"a.0.weight_mask": np.ones((5, 125), np.uint8)})
    _assert_one_failure(root, tmp_path / "out", str(target), "'a.0.weight'", "(5, 125)", "(25, 25)")


def test_shape_changes_between_rounds(tmp_path, copy_fixture):
    root, _good, bad = _two_runs(tmp_path, copy_fixture)
    target = bad / "round_3.safetensors"
    t = load_file(str(target))
    t["rest.weight"] = t["rest.weight"].reshape(25, 75)
    t["rest.weight_mask"] = t["rest.weight_mask"].reshape(25, 75)
    save_file(t, str(target))
    _assert_one_failure(root, tmp_path / "out", str(target), "'rest.weight'", "shape changes between rounds",
                        "(75, 25) in round 2", "(25, 75) in round 3")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_weights(tmp_path, copy_fixture, value):
    root, _good, bad = _two_runs(tmp_path, copy_fixture)
    target = bad / "round_2.safetensors"
    w = load_file(str(target))["a.0.weight"].copy()
    w[0, 0] = value
    _rewrite(target, **{"a.0.weight": w})
    _assert_one_failure(root, tmp_path / "out", str(target), "'a.0.weight'", "NaN or infinite")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli("analyze", tmp_path / "empty", "-o", tmp_path / "out", expect=1)
    assert f"{tmp_path / 'empty'}: no IMP runs found" in result.output
    assert not (tmp_path / "out" / "runs.parquet").exists()


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_names_os_system_is_refused_and_nothing_runs(tmp_path, copy_fixture):
    root = tmp_path / "runs"
    copy_fixture("closed-form/safetensors", "runs/good")
    bad = copy_fixture("closed-form/prune-style", "runs/bad")
    marker = tmp_path / "pwned"
    obj = torch.load(bad / "2checkpoint.pth.tar", weights_only=True)
    obj["hook"] = _Payload(marker)
    torch.save(obj, bad / "2checkpoint.pth.tar")
    _assert_one_failure(root, tmp_path / "out", str(bad / "2checkpoint.pth.tar"), "refused",
                                "posix.system", "nothing was executed")
    assert not marker.exists()


def test_whole_module_pickle_with_a_malicious_hook_is_refused(tmp_path, copy_fixture):
    # a pickled module (as BERT-Tickets' model.pt) whose forward hook's pickle calls os.system
    run = copy_fixture("bert-tickets")
    marker = tmp_path / "pwned"
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    model.register_forward_pre_hook(_Payload(marker))
    target = run / "mrpc" / "checkpoint-1000" / "model.pt"
    torch.save(model, target)
    tables = analyze(run, tmp_path / "out", expect=1)
    error = tables["runs"]["error"][0]
    assert str(target) in error and "refused" in error and "posix.system" in error
    assert not marker.exists()


def test_strict_stops_at_the_first_failure(tmp_path, copy_fixture):
    root, _good, bad = _two_runs(tmp_path, copy_fixture)
    (bad / "round_2.safetensors").write_bytes(b"garbage!")
    result = run_cli("analyze", root, "-o", tmp_path / "out", "-q", "--strict", expect=1)
    assert "round_2.safetensors" in result.output
    assert not (tmp_path / "out" / "runs.parquet").exists()


def test_second_analysis_replaces_the_tables_whole(tmp_path):
    out = tmp_path / "out"
    analyze(FIXTURES / "closed-form", out)
    first = read_tables(out)
    assert first["runs"].height == 4
    analyze(FIXTURES / "torch-prune", out)
    second = read_tables(out)
    assert second["runs"]["run"].to_list() == ["seed0"]
    for table in second.values():
        assert set(table["run"].unique()) <= {"seed0"}
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        [f"{t}.parquet" for t in TABLES] + ["flowscan-analysis.json"])


def test_an_interrupted_analysis_resumes_from_cached_rounds(tmp_path, monkeypatch):
    cache = tmp_path / "out" / ".cache"
    options = pipeline.Options(cache_dir=cache)
    calls = []
    real = pipeline.reduce_round

    def interrupted(rnd, names: NameOptions, *args):
        calls.append(rnd.index)
        if rnd.index == 3:
            raise KeyboardInterrupt  # the user hits Ctrl-C while round 3 is read
        return real(rnd, names, *args)

    monkeypatch.setattr(pipeline, "reduce_round", interrupted)
    run = FIXTURES / "closed-form" / "safetensors"
    with pytest.raises(KeyboardInterrupt):
        pipeline.analyze(run, options)
    assert calls == [0, 1, 2, 3]

    calls.clear()
    monkeypatch.setattr(pipeline, "reduce_round",
                        lambda rnd, names, *args: (calls.append(rnd.index), real(rnd, names, *args))[1])
    resumed = pipeline.analyze(run, options)
    assert calls == [3, 4]  # rounds 0-2 came from the cache
    fresh = pipeline.analyze(run, pipeline.Options())
    np.testing.assert_array_equal(resumed[0].flow.abs_sum, fresh[0].flow.abs_sum)


def test_a_changed_file_is_not_served_from_the_cache(tmp_path, copy_fixture):
    run = copy_fixture("closed-form/safetensors", "run")
    out = tmp_path / "out"
    before = analyze(run, out)
    target = run / "round_4.safetensors"
    w = load_file(str(target))
    w["a.0.weight"] = w["a.0.weight"] * 2
    save_file(w, str(target))
    after = analyze(run, out)
    assert after["rounds"].filter(round=4, block="a.0")["abs_sum"][0] == pytest.approx(
        2 * before["rounds"].filter(round=4, block="a.0")["abs_sum"][0])


@pytest.mark.parametrize("n_tasks", [6, 80])   # 80: rounds go to the workers in batches
def test_a_dying_worker_costs_only_its_round(tmp_path, n_tasks, monkeypatch):
    import crashing_reducer
    from flowscan.readers.base import Round

    tasks = [((i % 2, i), Round(i, "prune-style", (tmp_path / f"{i}.pt",))) for i in range(n_tasks)]
    options = pipeline.Options(jobs=2, engine="processes")
    if n_tasks > 6:
        assert max(1, min(engines.MAX_BATCH, n_tasks // (options.jobs * 8))) > 1
    pools = []

    class Counted(engines.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(kwargs.get("max_workers"))
            super().__init__(*args, **kwargs)
    monkeypatch.setattr(engines, "ProcessPoolExecutor", Counted)
    outcomes = list(pipeline._reduce_all(tasks, options, None, crashing_reducer.reduce_or_die))
    assert len(outcomes) == n_tasks
    # after the death: the suspects one round a task, then the few in flight alone, then the rest
    assert len(pools) <= 2 + options.jobs + 1 + 1, pools
    reduced = sorted((o for _key, o in outcomes if o.startswith("reduced")), key=lambda o: int(o.split()[1]))
    assert reduced == [f"reduced {i}" for i in range(n_tasks) if i != 2]
    [(key, died)] = [(key, o) for key, o in outcomes if not o.startswith("reduced")]
    assert died.startswith(f"{tmp_path / '2.pt'}: the process reading this round died")
    assert key == (0, 2)   # charged to the run of round 2 only


MASK_DTYPES = ["float16", "float32", "float64", "uint8", "int8", "int32", "uint16", "bool"]


def _bad_mask_values():
    """(dtype, value) for every value that dtype can hold and that is neither 0 nor 1."""
    for dtype in MASK_DTYPES:
        for bad in (0.5, 2, -1, float("nan"), float("inf")):
            kind = np.dtype(dtype).kind
            if kind == "b" or (kind in "iu" and (not float(bad).is_integer() or bad != bad)) or \
                    (kind == "u" and bad < 0):
                continue
            yield dtype, bad


@pytest.mark.parametrize("dtype", MASK_DTYPES)
def test_every_mask_dtype_counts_0_1_masks(dtype):
    """0/1 masks (and -0.0) give the count of ones in every dtype, across a chunk boundary."""
    from flowscan.readers.base import TensorRef
    from flowscan.reduce import CHUNK, reduce_tensor

    n = CHUNK + 1000
    mask = (np.arange(n) % 3 == 0).astype(dtype)
    if np.dtype(dtype).kind == "f":
        mask[1] = -0.0
    sums, bits = reduce_tensor(TensorRef("layer.weight", np.ones(n, dtype=np.float32), mask, "w.pt"))
    assert sums.n_unpruned == (n + 2) // 3 and sums.abs_sum == (n + 2) // 3
    np.testing.assert_array_equal(np.unpackbits(bits)[:n], np.arange(n) % 3 == 0)


@pytest.mark.parametrize("dtype,bad", list(_bad_mask_values()))
def test_every_mask_dtype_refuses_values_other_than_0_and_1(dtype, bad):
    """One such value, in the second chunk, fails the tensor naming it and its file."""
    from flowscan.readers.base import TensorRef
    from flowscan.reduce import CHUNK, reduce_tensor

    n = CHUNK + 1000
    mask = (np.arange(n) % 3 == 0).astype(dtype)
    mask[CHUNK + 7] = bad
    with pytest.raises(ScanError, match="mask is not 0/1") as err:
        reduce_tensor(TensorRef("layer.weight", np.ones(n, dtype=np.float32), mask, "w.pt"))
    assert "layer.weight" in str(err.value) and "w.pt" in str(err.value)
