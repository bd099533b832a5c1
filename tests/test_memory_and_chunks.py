"""Resources a small file can demand, bounded: HDF5 nesting walked once (linear, with a depth limit),
each compressed chunk decompressed once however the reducer slices it, compressed .npz members
streamed, and one memory budget shared by everything an analysis inflates at once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import h5py
import numpy as np
import pytest

from flowscan.errors import ScanError
from flowscan.io import h5_file, npz_file
from flowscan.io.arrays import ChunkedArray, StreamedArray
from flowscan.io.budget import Budget
from flowscan.readers.base import TensorRef
from flowscan.reduce import CHUNK, reduce_tensor


# -- HDF5 nesting ------------------------------------------------------------------------------
def _nested(path, depth: int, cycle: bool = False):
    with h5py.File(path, "w") as f:
        g = f
        for _ in range(depth):
            g = g.create_group("g")
        g.create_dataset("w", data=np.ones(3))
        if cycle:
            g["back"] = f["g"]   # a hard link to an ancestor
            f["g"]["twice"] = f["g"]


def test_deep_nesting_is_refused_by_name_without_a_quadratic_walk(tmp_path):
    _nested(tmp_path / "deep.h5", 3000)
    started = time.monotonic()
    with h5py.File(tmp_path / "deep.h5", "r") as f, pytest.raises(ScanError, match="nested more than 64 deep"):
        h5_file.check_self_contained(f, tmp_path / "deep.h5")
    assert time.monotonic() - started < 30   # the whole-path walk took minutes


@pytest.mark.parametrize("cycle", [False, True])
def test_nesting_within_the_limit_is_walked_once(tmp_path, cycle):
    _nested(tmp_path / "ok.h5", 60, cycle)
    with h5py.File(tmp_path / "ok.h5", "r") as f:
        h5_file.check_self_contained(f, tmp_path / "ok.h5")


# -- each chunk decompressed once ----------------------------------------------------------------
@pytest.mark.parametrize("shape,rows", [((1, 3 * CHUNK + 5), 1), ((4000, 300), 700), ((10, 7, 3 * CHUNK // 20), 3),
                                        ((2 * CHUNK + 3,), CHUNK // 2)])
def test_banded_arrays_read_each_band_once_and_exactly(shape, rows):
    full = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    reads = []

    def read(index):
        reads.append(index)
        return full[index]

    array = ChunkedArray(shape, np.float32, read, chunk_rows=rows)
    sums, _bits = reduce_tensor(TensorRef("w", array, None, "x"))
    assert sums.abs_sum == float(np.abs(full.astype(np.float64)).sum())
    bands = -(-shape[0] // rows)
    assert sorted(r[0].start for r in reads) == [b * rows for b in range(bands)]   # each band once
    assert array._band == [None, None]   # released with the tensor


def test_a_compressed_hdf5_chunk_is_read_in_bands_of_whole_chunks(tmp_path):
    n = 1 << 22
    values = np.linspace(-1, 1, n, dtype=np.float32)
    path = tmp_path / "w.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("big", data=values.reshape(1, n), chunks=(1, n), compression="gzip")
        f.create_dataset("plain", data=values.reshape(1, n))
    with h5py.File(path, "r") as f:
        big = h5_file.lazy(path, "big", f["big"])
        assert big._chunk_rows == 1 and h5_file.lazy(path, "plain", f["plain"])._chunk_rows is None
        started = time.monotonic()
        sums, _bits = reduce_tensor(TensorRef("big", big, None, path))
        assert time.monotonic() - started < 20   # 16 slices each decompressing the chunk again took far more
    assert sums.abs_sum == float(np.abs(values.astype(np.float64)).sum())


def test_chunks_too_large_for_the_budget_are_refused_by_name(tmp_path, monkeypatch):
    from flowscan.io import budget

    path = tmp_path / "w.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("big", data=np.zeros((4, 1 << 16), np.float32), chunks=(4, 1 << 16), compression="gzip")
    monkeypatch.setattr(budget.BUDGET, "total", 1 << 19)
    with h5py.File(path, "r") as f, pytest.raises(ScanError, match="decompressed once each, more than the memory"):
        h5_file.lazy(path, "big", f["big"])


# -- compressed npz members are streamed -----------------------------------------------------------
def test_compressed_npz_members_stream_to_the_exact_sums(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3 * CHUNK + 11,)).astype(np.float32).reshape(-1, 1)
    m = (rng.random(w.shape) < 0.3).astype(np.uint8)
    np.savez_compressed(tmp_path / "r.npz", w=w, w_mask=m, f=np.asfortranarray(rng.normal(size=(30, 40))))
    arrays = npz_file.load(tmp_path / "r.npz")
    assert isinstance(arrays["w"], StreamedArray) and not isinstance(arrays["f"], StreamedArray)
    sums, bits = reduce_tensor(TensorRef("w", arrays["w"], arrays["w_mask"], tmp_path / "r.npz"))
    assert sums.abs_sum == float(np.abs(w.astype(np.float64))[m.astype(bool)].sum())
    assert sums.n_unpruned == int(m.sum())
    np.testing.assert_array_equal(np.unpackbits(bits)[:m.size], m.reshape(-1))
    np.testing.assert_array_equal(np.asarray(arrays["f"]), np.load(tmp_path / "r.npz")["f"])
    np.testing.assert_array_equal(np.asarray(arrays["w"]), w)   # whole, and again after a reopen


def test_a_damaged_streamed_member_is_named(tmp_path):
    np.savez_compressed(tmp_path / "r.npz", w=np.arange(1 << 16, dtype=np.float32))
    raw = bytearray((tmp_path / "r.npz").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / "r.npz").write_bytes(bytes(raw))
    arrays = npz_file.load(tmp_path / "r.npz")
    with pytest.raises(ScanError, match="r.npz.*cannot inflate array|r.npz.*longer than"):
        reduce_tensor(TensorRef("w", arrays["w"], None, tmp_path / "r.npz"))


def test_npz_that_inflate_to_gigabytes_cost_a_chunk_of_memory(tmp_path):
    root = tmp_path / "runs" / "run"
    root.mkdir(parents=True)
    for r in range(3):   # 320 MB each once inflated, 300 kB on disk
        np.savez_compressed(root / f"round_{r}.npz", **{"fc.weight": np.zeros((1 << 14, 1 << 12), np.float32),
                                                         "fc.weight_mask": np.ones((1 << 14, 1 << 12), np.uint8)})
    # VmHWM, not ru_maxrss: Linux carries the forking parent's peak across exec into ru_maxrss
    code = textwrap.dedent(f"""
        from flowscan.cli import main
        try:
            main(["analyze", {str(root.parent)!r}, "-o", {str(tmp_path / 'out')!r}, "-q", "-j", "2", "--no-cache"])
        except SystemExit:
            pass
        print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    peak_mb = int(done.stdout.split()[-1]) / 1024
    assert peak_mb < 450, (peak_mb, done.stderr[-2000:])   # inflating them: 2 x 320 MB and more


# -- one budget ------------------------------------------------------------------------------------
def test_the_budget_refuses_what_never_fits_and_waits_for_what_will():
    budget = Budget(100)
    with pytest.raises(ScanError, match="needs 101 bytes in memory at once, more than"):
        budget.take(101, "f", "x")
    first = budget.take(60, "f", "x")
    with pytest.raises(ScanError, match="while other reads hold 60 of the 100-byte budget"):
        budget.take(60, "g", "y", wait=0.1)
    threading.Timer(0.2, first.release).start()
    second = budget.take(60, "g", "y", wait=10)   # granted once the first is given back
    assert budget.held == 60
    second.release()
    second.release()   # once only
    assert budget.held == 0
    owner = np.empty(1)
    budget.take(50, "h", "z").tie(owner)
    assert budget.held == 50
    del owner
    assert budget.held == 0


def test_a_band_that_cannot_get_its_memory_names_its_file_and_tensor(monkeypatch):
    from flowscan.io import budget

    monkeypatch.setattr(budget.BUDGET, "total", 1 << 20)
    monkeypatch.setattr(budget, "WAIT_SECONDS", 0.05)
    held = budget.BUDGET.take(1 << 20, "other", "another round's bytes")
    try:
        array = ChunkedArray((4, 1000), np.float32, lambda index: np.ones((4, 1000), np.float32)[index], chunk_rows=4)
        with pytest.raises(ScanError, match=r"^r\.h5: tensor 'w': a band of compressed chunks needs 16,000 bytes "
                                            r"in memory while other reads hold"):
            reduce_tensor(TensorRef("w", array, None, "r.h5"))
    finally:
        held.release()
    assert budget.BUDGET.held == 0
