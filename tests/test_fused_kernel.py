"""The compiled kernel (flowscan/_fused.c) against the numpy reduction: every weight x mask dtype
pair, sizes around the chunk and byte boundaries, NaN/inf kept and pruned, and every kind of
invalid mask give identical counts, bits and messages, and sums within 1e-12 relative."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from flowscan import reduce
from flowscan.errors import ScanError
from flowscan.io import safetensors_file
from flowscan.readers.base import TensorRef

pytestmark = pytest.mark.skipif(reduce.KERNEL is None, reason="the fused kernel is not compiled here")

WEIGHTS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
MASKS = [None, torch.uint8, torch.bool, torch.float32, torch.float64, torch.float16, torch.bfloat16]
SIZES = [0, 1, 7, 8, 9, 63, 64, 65, 200]   # with a chunk of 64 elements: 0 to 4 chunks
CASES = ["plain", "zeros", "subnormal", "nan_kept", "nan_pruned", "inf_pruned", "neg_zero_mask", "mask_2", "mask_half",
         "mask_negative", "mask_nan", "bool_byte_2"]


ISAS = reduce.KERNEL.ISAS if reduce.KERNEL is not None else ()


class Spy:
    """The kernel's loop for one instruction set, counting the chunks it reduced itself (status 0)."""

    def __init__(self, kernel, isa: str):
        self.kernel, self.isa, self.reduced = kernel, isa, 0

    def reduce_chunk(self, *args):
        result = self.kernel.reduce_chunk(*args[:5], self.isa)   # in place of the default loop
        self.reduced += result[3] == 0
        return result


def _case(size: int, case: str, wdtype, mdtype, rng) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    w = torch.from_numpy(rng.standard_normal(size) * 3).to(wdtype)
    m = torch.from_numpy((rng.random(size) < 0.6).astype(np.uint8)) if mdtype is not None else None
    at = min(size - 1, size // 2 + (size > 64) * 40)   # past the first chunk when there are several
    if size == 0 and case != "plain":
        return None
    if case == "zeros":
        w[::3] = 0
    elif case == "subnormal":   # every weight subnormal in its own format: the sums scale exactly
        tiny = {torch.float16: 6e-8, torch.float64: 1e-310}.get(wdtype, 1e-40)
        w = (torch.tensor(tiny, dtype=torch.float64) * (1 + torch.arange(size) % 200)).to(wdtype)
    elif case in ("nan_kept", "nan_pruned", "inf_pruned"):
        w[at] = float("nan") if case.startswith("nan") else float("inf")
        if m is not None:
            m[at] = 1 if case == "nan_kept" else 0
    elif case == "neg_zero_mask":
        if mdtype is None or not mdtype.is_floating_point:
            return None
        return w, torch.where(m.bool(), torch.tensor(1.0), torch.tensor(-0.0)).to(mdtype)
    elif case.startswith("mask_"):
        if mdtype is None or mdtype == torch.bool:
            return None
        if case != "mask_2" and not mdtype.is_floating_point:
            return None
        m = m.to(mdtype)
        m[at] = {"mask_2": 2, "mask_half": 0.5, "mask_negative": -1, "mask_nan": float("nan")}[case]
        return w, m
    elif case == "bool_byte_2":
        if mdtype != torch.bool:
            return None
        m[at] = 2
        return w, m.view(torch.bool)   # a corrupt bool: byte 2
    if m is not None:
        m = m.view(torch.bool) if mdtype == torch.bool else m.to(mdtype)
    return w, m


def _reduce(ref: TensorRef, kernel):
    saved = reduce.KERNEL
    reduce.KERNEL = kernel
    try:
        sums, bits = reduce.reduce_tensor(ref)
        return ("ok", sums, bits)
    except ScanError as exc:
        return ("error", str(exc), None)
    finally:
        reduce.KERNEL = saved


@pytest.mark.parametrize("step", [128, 1 << 24], ids=["steps-of-two-chunks", "whole-tensors"])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("wdtype", WEIGHTS, ids=str)
def test_kernel_and_numpy_agree_on_every_dtype_pair_and_bad_value(tmp_path, monkeypatch, wdtype, isa, step):
    """Mapped arrays go to the kernel `step` elements a call; a step it flags is redone chunk by chunk
    (the kernel, then numpy for the chunk that holds the bad value)."""
    monkeypatch.setattr(reduce, "CHUNK", 64)
    monkeypatch.setattr(reduce, "KERNEL_STEP", step)
    rng = np.random.default_rng(7)
    spy, compared, errors = Spy(reduce.KERNEL, isa), 0, 0
    for mdtype in MASKS:
        tensors, cases = {}, []
        for size in SIZES:
            for case in CASES:
                made = _case(size, case, wdtype, mdtype, rng)
                if made is None:
                    continue
                key = f"{size}_{case}"
                tensors[f"w{key}"] = made[0].reshape(-1, 1) if size % 2 == 0 and size else made[0]
                if made[1] is not None:
                    tensors[f"m{key}"] = made[1]
                cases.append(key)
        path = tmp_path / f"{str(mdtype).replace('torch.', '')}.safetensors"
        save_file(tensors, str(path))
        arrays, _ = safetensors_file.load(path)
        for key in cases:
            ref = TensorRef(key, arrays[f"w{key}"], arrays.get(f"m{key}"), path)
            fused, plain = _reduce(ref, spy), _reduce(ref, None)
            assert fused[0] == plain[0], (key, mdtype, fused, plain)
            compared += 1
            if fused[0] == "error":
                assert fused[1] == plain[1]   # the same message, word for word
                errors += 1
                continue
            a, b = fused[1], plain[1]
            assert (a.n_params, a.masked, a.n_unpruned, a.n_nonzero, a.kind) == \
                   (b.n_params, b.masked, b.n_unpruned, b.n_nonzero, b.kind), (key, mdtype)
            assert a.abs_sum == pytest.approx(b.abs_sum, rel=1e-12, abs=0), (key, mdtype)
            assert (fused[2] is None) == (plain[2] is None), (key, mdtype)
            if fused[2] is not None:
                assert np.array_equal(fused[2], plain[2]), (key, mdtype)
    # the kernel did the work where it can; numpy only where a chunk holds something to report
    assert spy.reduced > 0.6 * compared and errors > 0
    # and every bad-value case was caught (a mask value or a non-finite weight in some chunk)
    assert errors >= len([1 for m in MASKS for s in SIZES if s])   # at least nan_kept per size


@pytest.mark.parametrize("isa", ISAS)
def test_kernel_reduces_real_sized_tensors_as_numpy_does(tmp_path, isa):
    rng = np.random.default_rng(3)
    n = 3 * reduce.CHUNK + 1001
    tensors = {"w32": torch.from_numpy(rng.standard_normal(n).astype(np.float32)),
               "wbf": torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(torch.bfloat16),
               "wf16": torch.from_numpy(rng.standard_normal(n).astype(np.float16)),
               "m8": torch.from_numpy((rng.random(n) < 0.2).astype(np.uint8)),
               "mf": torch.from_numpy((rng.random(n) < 0.7).astype(np.float32))}
    path = tmp_path / "big.safetensors"
    save_file(tensors, str(path))
    arrays, _ = safetensors_file.load(path)
    for w in ("w32", "wbf", "wf16"):
        for m in ("m8", "mf", None):
            ref = TensorRef(w, arrays[w], arrays.get(m) if m else None, path)
            fused, plain = _reduce(ref, Spy(reduce.KERNEL, isa)), _reduce(ref, None)
            assert fused[1].n_unpruned == plain[1].n_unpruned
            assert fused[1].abs_sum == pytest.approx(plain[1].abs_sum, rel=1e-12)
            assert (fused[2] is None and plain[2] is None) or np.array_equal(fused[2], plain[2])
            # and against a third computation: float64 sums of the stored values
            values = tensors[w].double().numpy()
            kept = tensors[m].double().numpy() if m else np.ones(n)
            assert fused[1].abs_sum == pytest.approx(float(np.abs(values * kept).sum()), rel=1e-12)


def test_kernel_can_be_turned_off_and_formats_says_which_path_runs():
    def formats(choice: str | None) -> str:
        env = {k: v for k, v in os.environ.items() if k != "FLOWSCAN_KERNEL"}
        if choice is not None:
            env["FLOWSCAN_KERNEL"] = choice
        out = subprocess.run([sys.executable, "-m", "flowscan", "formats"], env=env, capture_output=True, text=True)
        return out.stdout.strip().splitlines()[-1]

    assert formats("numpy").startswith("reduction: numpy (FLOWSCAN_KERNEL=numpy)")
    assert formats(None).startswith("reduction: compiled (flowscan._fused")
    assert "its portable loop (FLOWSCAN_KERNEL=portable)" in formats("portable")
    assert "FLOWSCAN_KERNEL='fast' is not one of numpy, portable, so it is ignored" in formats("fast")


def test_survival_counts_bits_kept_in_both_rounds_as_numpy_does():
    rng = np.random.default_rng(11)
    for n in (0, 1, 7, 8, 9, 63, 64, 1001, 1 << 16):
        a, b = rng.integers(0, 256, n, dtype=np.uint8), rng.integers(0, 256, n, dtype=np.uint8)
        expected = int(np.unpackbits(a & b).sum())   # a second path: unpacked bits, not a popcount
        assert reduce.KERNEL.count_both(a, b) == expected
        assert reduce.count_both(a, b) == expected
        assert reduce.count_both(a[::2], b[::2]) == int(np.unpackbits(a[::2] & b[::2]).sum())   # strided: numpy
    with pytest.raises(ValueError):
        reduce.KERNEL.count_both(np.zeros(3, np.uint8), np.zeros(4, np.uint8))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mprotect through ctypes: Linux")
@pytest.mark.parametrize("isa", ISAS)
def test_kernel_reads_nothing_past_a_buffer_that_ends_before_an_unreadable_page(isa):
    """Weights and masks that end exactly where readable memory ends: the loops prefetch thousands of
    elements ahead, and a prefetch must never fault (a load past the end would kill the process)."""
    import mmap

    page = mmap.PAGESIZE
    code = (
        "import ctypes, mmap, sys, numpy as np\n"
        "from flowscan import reduce\n"
        f"page, isa = {page}, {isa!r}\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]\n"
        "def ending_at_a_guard_page(nbytes, dtype):   # readable bytes, then a page that faults\n"
        "    pages = -(-nbytes // page)\n"
        "    area = mmap.mmap(-1, (pages + 1) * page)\n"
        "    base = ctypes.addressof(ctypes.c_char.from_buffer(area))\n"
        "    assert libc.mprotect(base + pages * page, page, 0) == 0\n"
        "    return np.frombuffer(area, np.uint8)[pages * page - nbytes:pages * page].view(dtype)\n"
        "for wcode, wdtype, mcode, mdtype in [('f4', np.float32, 'u1', np.uint8), ('bf16', np.uint16, 'u1', np.uint8),\n"
        "                                     ('f2', np.float16, 'f4', np.float32), ('f8', np.float64, '', None)]:\n"
        "    n = 3 * page + 40   # not a whole number of pages: the tail loop runs too\n"
        "    w = ending_at_a_guard_page(n * np.dtype(wdtype).itemsize, wdtype)\n"
        "    values = (np.arange(n) % 5).astype(np.float32)\n"
        "    w[:] = (values.view(np.uint32) >> 16) if wcode == 'bf16' else values\n"
        "    m = ending_at_a_guard_page(n * np.dtype(mdtype).itemsize, mdtype) if mdtype else None\n"
        "    if m is not None:\n"
        "        m[:] = np.arange(n) % 2\n"
        "    bits = np.empty((n + 7) // 8, np.uint8)\n"
        "    total, ones, nonzero, status = reduce.KERNEL.reduce_chunk(w, wcode, m, mcode, bits, isa)\n"
        "    values = (np.arange(n) % 5).astype(np.float64) * ((np.arange(n) % 2) if m is not None else 1)\n"
        "    assert status == 0 and total == values.sum(), (wcode, total, values.sum())\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
