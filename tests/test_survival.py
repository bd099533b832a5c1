"""Survival of each round's kept weights into the next round, per block (survival.parquet)."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import FIXTURES, analyze
from flowscan.reduce import popcount, survival_counts


def test_nested_imp_masks_survive_at_the_pruning_rate(tmp_path):
    tables = analyze(FIXTURES / "closed-form" / "safetensors", tmp_path, "--blocks", r"^(a|b)\.")
    surv = tables["survival"].sort("block", "round")
    assert surv["survival"].to_numpy() == pytest.approx(0.8, abs=1e-12)  # 20 % of the survivors go
    assert surv["n_revived"].to_list() == [0] * surv.height
    a = surv.filter(block="a")
    assert a["n_survivors"].to_list() == [625, 500, 400, 320]
    assert a["n_still_surviving"].to_list() == [500, 400, 320, 256]


def test_non_nested_masks_count_revived_weights(tmp_path):
    # round 0 keeps entries {0..5}, round 1 keeps {3..9}: 3 survive, 4 are revived
    w = np.arange(1, 13, dtype=np.float32).reshape(3, 4)
    m0 = np.zeros(12, np.uint8)
    m0[:6] = 1
    m1 = np.zeros(12, np.uint8)
    m1[3:10] = 1
    for n, m in enumerate((m0, m1)):
        save_file({"x.weight": w, "x.weight_mask": m.reshape(3, 4)}, str(tmp_path / f"round_{n}.safetensors"))
    row = analyze(tmp_path, tmp_path / "out")["survival"].row(0, named=True)
    assert (row["n_survivors"], row["n_still_surviving"], row["n_revived"]) == (6, 3, 4)
    assert row["survival"] == pytest.approx(0.5)


def test_inferred_masks_survival_matches_numpy(tmp_path):
    tables = analyze(FIXTURES / "hf-sharded", tmp_path, "--blocks", "per-tensor")
    name = "encoder.layer.1.dense.weight"

    def weights(n):
        out = {}
        for shard in (FIXTURES / "hf-sharded" / f"step_{n}").glob("*.safetensors"):
            out.update(load_file(str(shard)))
        return out[name]

    for n in (0, 1):
        before, after = weights(n) != 0, weights(n + 1) != 0
        row = tables["survival"].filter(block="encoder.layer.1.dense", round=n).row(0, named=True)
        assert row["n_survivors"] == int(before.sum())
        assert row["n_still_surviving"] == int((before & after).sum())


def test_survival_counts_and_padding_bits():
    a = np.packbits(np.array([1, 1, 0, 1, 0, 0, 1, 1, 1], bool))
    b = np.packbits(np.array([1, 0, 0, 1, 1, 0, 1, 1, 0], bool))
    assert popcount(a) == 6
    assert survival_counts(a, b, 9) == (6, 4, 5)
    assert survival_counts(None, b, 9) == (9, 5, 5)
    assert survival_counts(a, None, 9) == (6, 6, 9)


def test_late_zeros_in_an_odd_sized_tensor_give_exact_bits():
    from pathlib import Path

    from flowscan.readers.base import TensorRef
    from flowscan.reduce import CHUNK, reduce_tensor

    w = np.ones((1, CHUNK + 5), np.float32)
    w[0, CHUNK + 1] = 0.0  # the only zero, in the second chunk
    sums, bits = reduce_tensor(TensorRef("w", w, None, Path("x")))
    assert sums.n_nonzero == CHUNK + 4
    assert popcount(bits) == CHUNK + 4
    np.testing.assert_array_equal(np.unpackbits(bits)[: CHUNK + 5], (w[0] != 0).astype(np.uint8))


def test_mask_bits_are_dropped_once_both_steps_are_counted():
    from pathlib import Path

    from flowscan.pipeline import _count_survival
    from flowscan.readers.base import Round, Run
    from flowscan.reduce import RoundSums, TensorSums

    def round_sums(index, kept):
        bits = np.packbits(np.arange(16) < kept)
        t = TensorSums((16,), 16, True, kept, kept, 1.0, "x")
        return RoundSums(index, {"w": t}, {}, {"w": bits})

    run = Run(Path("r"), "x", [Round(i, "x", ()) for i in range(3)])
    sums, steps = {}, {}
    for index, kept in ((0, 16), (2, 8), (1, 12)):  # out of order, as with --jobs
        sums[index] = round_sums(index, kept)
        _count_survival(run, sums, steps, index)
        if index == 2:
            assert steps == {} and all(s.bits for s in sums.values())  # nothing countable yet
    assert steps == {0: {"w": (16, 12, 12)}, 1: {"w": (12, 8, 8)}}
    assert all(not s.bits for s in sums.values())


def test_the_bits_pool_takes_back_only_the_buffers_it_lent():
    from flowscan.reduce import BitsPool

    pool = BitsPool(keep=2)
    lent = pool.take(10)
    pool.give_back({"a": lent[:4], "b": lent[4:]})
    assert pool.take(10) is lent                       # reused whole
    assert pool.take(10) is not lent                   # and lent once only
    stranger = np.empty(10, np.uint8)
    pool.give_back({"a": stranger[:5]})                # not lent here: left alone
    assert pool.take(10) is not stranger
    copies = [pool.take(10) for _ in range(4)]
    pool.give_back({str(i): c[:3] for i, c in enumerate(copies)})
    taken = [pool.take(10) for _ in range(4)]
    assert sum(any(t is c for c in copies) for t in taken) == 2   # `keep` of them waited
    assert pool.take(11).size == 11
    small = BitsPool(keep=8, max_bytes=25)
    lent = [small.take(10) for _ in range(3)]
    small.give_back({str(i): b[:1] for i, b in enumerate(lent)})
    assert sum(any(t is b for b in lent) for t in [small.take(10) for _ in range(3)]) == 2   # 20 bytes of 25


def test_survival_is_the_same_when_round_buffers_are_reused_across_runs(tmp_path, monkeypatch):
    """Runs of different tensor sizes, reduced on one and on two threads: buffers given back after one
    step are lent to later rounds, and every survival count is still the one numpy computes from the
    masks."""
    from flowscan import pipeline, reduce

    rng = np.random.default_rng(5)
    expected = {}
    for r, size in enumerate((37, 64, 37, 200)):
        folder = tmp_path / "runs" / f"run{r}"
        folder.mkdir(parents=True)
        kept = np.ones(size, bool)
        for n in range(6):
            kept = kept & (rng.random(size) < 0.85)   # nested, with odd survivors
            save_file({"x.weight": rng.standard_normal((1, size)).astype(np.float32),
                       "x.weight_mask": kept.astype(np.uint8).reshape(1, size)}, str(folder / f"round_{n}.safetensors"))
            expected[(f"run{r}", n)] = kept.copy()

    class Counting(reduce.BitsPool):
        reused = 0

        def take(self, nbytes):
            free = {id(b) for b in self._free}
            buffer = super().take(nbytes)
            Counting.reused += id(buffer) in free
            return buffer

    pool = Counting()
    monkeypatch.setattr(reduce, "BITS", pool)
    monkeypatch.setattr(pipeline, "BITS", pool)
    # one job: each round's outcome is handled before the next is reduced, so reuse is certain; two:
    # whether a buffer comes back before the next round starts is up to the threads' timing
    for jobs in (1, 2):
        results = pipeline.analyze(tmp_path / "runs", pipeline.Options(jobs=jobs, verify=False))
        if jobs == 1:
            assert Counting.reused > 0
        for result in results:
            run = result.run.name
            for step, (before, both, after) in enumerate(result.survival[:, 0, :].tolist()):
                a, b = expected[(run, step)], expected[(run, step + 1)]
                assert (before, both, after) == (a.sum(), (a & b).sum(), b.sum()), (run, step)
