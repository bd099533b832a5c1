"""The map step: one round's checkpoint in, a few numbers per tensor out.

Every tensor of the round is reduced, chunk by chunk with reused buffers (float32 |w|*m summed
in float64), and checked: masks must be 0/1 and weights finite. Blocks and the prunable set
are applied afterwards, so results can be cached per round and regrouped without rereading.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flowscan.errors import ScanError
from flowscan.io.arrays import Checksum, ChunkedArray, StoredArray, is_bfloat16, widen_bfloat16
from flowscan.readers import names, registry
from flowscan.readers.base import NameOptions, Round, TensorRef

CHUNK = 1 << 18  # elements; 1 MiB float32 buffers stay in cache (measured fastest)
# Elements the kernel reduces per call when it reads the arrays in place: a call's Python costs
# about as much as a chunk's reduction (bfloat16 x uint8 at -j2: 12 % faster than chunk by chunk),
# and the GIL is still free while it runs
KERNEL_STEP = 1 << 24

# The fused kernel (flowscan/_fused.c): one pass per chunk instead of numpy's six. Optional: it is
# compiled at install when a C compiler is there. FLOWSCAN_KERNEL=numpy turns it off and
# FLOWSCAN_KERNEL=portable keeps it off the CPU-specific (AVX2) loop. The numpy path stays the
# reference: chunks of other dtypes, non-contiguous views, and every chunk the kernel flags (a mask
# value other than 0/1, a non-finite weight) are reduced by numpy, so the rules and messages are
# numpy's alone.
KERNEL_CHOICES = ("", "numpy", "portable")
_CHOICE = os.environ.get("FLOWSCAN_KERNEL", "").strip().lower()
_TURNED_OFF = _CHOICE == "numpy"
try:
    from flowscan import _fused as KERNEL
except ImportError:   # no compiler at install time
    KERNEL = None
if _TURNED_OFF:
    KERNEL = None
_ISA = "portable" if _CHOICE == "portable" else ""   # "": the fastest loop the CPU runs
_WEIGHT_CODES = {np.dtype(np.float32): "f4", np.dtype(np.float64): "f8", np.dtype(np.float16): "f2"}
_MASK_CODES = {np.dtype(np.uint8): "u1", np.dtype(np.bool_): "b1", np.dtype(np.float32): "f4",
               np.dtype(np.float64): "f8", np.dtype(np.float16): "f2"}


def kernel_status() -> str:
    """Which reduction is in use, for `flowscan formats` and the README's promise."""
    unknown = (f"; FLOWSCAN_KERNEL={_CHOICE!r} is not one of numpy, portable, so it is ignored"
               if _CHOICE not in KERNEL_CHOICES else "")
    if KERNEL is not None:
        isa = _ISA or KERNEL.ISA
        loop = {"avx2": "its AVX2 loop",
                "portable": "its portable loop (FLOWSCAN_KERNEL=portable)" if _ISA else
                            "its portable loop (no AVX2 loop for this CPU)"}
        return f"compiled (flowscan._fused: one fused pass per chunk, {loop.get(isa, isa)}){unknown}"
    why = "FLOWSCAN_KERNEL=numpy" if _TURNED_OFF else "not compiled at install (no C compiler?)"
    return f"numpy ({why}); reinstall with a C compiler for the fused kernel{unknown}"


@dataclass(frozen=True)
class TensorSums:
    """Sums over one tensor of one round."""

    shape: tuple[int, ...]
    n_params: int
    masked: bool          # a mask is stored for this tensor in this round
    n_unpruned: int       # sum of the mask (n_params when no mask is stored)
    n_nonzero: int        # nonzero weights when no mask is stored (for inferred masks), else n_unpruned
    abs_sum: float        # sum |m * w|
    path: str             # file of the weight, for messages
    kind: str = "f"       # numpy dtype kind of the weight ("f", "i", ...): constant over a run's rounds

    @property
    def kept(self) -> int:
        """Entries its packed bits (RoundSums.bits) mark as kept: the mask's ones, or the nonzeros."""
        return self.n_nonzero


@dataclass(frozen=True)
class RoundSums:
    index: int
    tensors: dict[str, TensorSums]   # file order
    metrics: dict[str, float]     # found inside the round's files
    # packed bits (np.packbits, 1 = kept) of each stored mask, and of the nonzeros of 2+-D weights
    # without a mask that have zeros (for inferred masks); absent = all kept. For survival.
    bits: dict[str, np.ndarray] = field(default_factory=dict, compare=False)
    notes: tuple[str, ...] = ()   # what reading noticed (e.g. calls kept as inert records)

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "metrics": self.metrics, "notes": list(self.notes),
                "tensors": [{"name": k, **vars(v)} for k, v in self.tensors.items()]}   # flat fields only

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RoundSums":
        tensors = {}
        for t in data["tensors"]:
            t = dict(t)
            name = t.pop("name")
            t["shape"] = tuple(t["shape"])
            tensors[name] = TensorSums(**t)
        return cls(data["index"], tensors, dict(data["metrics"]), notes=tuple(data.get("notes", ())))


class _Buffers:
    """Scratch buffers reused across tensors (fresh large allocations are slow)."""

    def __init__(self):
        self._bufs: dict[np.dtype, np.ndarray] = {}

    def get(self, dtype: np.dtype, n: int) -> np.ndarray:
        buf = self._bufs.get(dtype)
        if buf is None or buf.size < n:
            buf = self._bufs[dtype] = np.empty(max(n, CHUNK), dtype=dtype)
        return buf[:n]


def _flat(array: Any, raw: bool = False) -> np.ndarray:
    """The array flattened; an array read in slices stays lazy (its slices are read per chunk).
    `raw`: a stored bfloat16 array as its raw bits."""
    if isinstance(array, StoredArray):
        return array.flat(raw)
    if isinstance(array, ChunkedArray):   # indexes as its flattened form already
        return array
    return np.asarray(array).reshape(-1)


def _accumulator(dtype: np.dtype) -> np.dtype:
    """Chunk dtype for |w|: float32 unless that would round the values (float64, wide ints)."""
    if dtype == np.float64 or (dtype.kind in "iu" and dtype.itemsize >= 4):
        return np.dtype(np.float64)
    return np.dtype(np.float32)


class BitsPool:
    """The packed masks of whole rounds, lent as one buffer a round and taken back once survival has
    been counted, for the rounds after. Fresh memory costs a page fault and a zeroing every 4 KiB:
    on a warm scan of per-round safetensors that was 7 % of the CPU time. Only a buffer this pool
    lent, still alive and the very same object, is taken back; at most `keep` buffers and `max_bytes`
    in all wait for reuse (the masks of a large model's round are simply freed: they would hold memory
    the scan promises not to take)."""

    def __init__(self, keep: int = 8, max_bytes: int = 64 << 20):
        self._lent: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()
        self._free: list[np.ndarray] = []
        self._keep, self._max_bytes = keep, max_bytes
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        with self._lock:
            at = next((i for i, b in enumerate(self._free) if b.size == nbytes), None)
            buffer = self._free.pop(at) if at is not None else None
        if buffer is None:
            buffer = np.empty(nbytes, dtype=np.uint8)
        with self._lock:
            self._lent[id(buffer)] = buffer
        return buffer

    def give_back(self, bits: dict[str, np.ndarray]) -> None:
        """Take back the round buffers under these packed masks; nothing else may still read them."""
        bases = {id(b.base): b.base for b in bits.values() if isinstance(b, np.ndarray) and b.base is not None}
        with self._lock:
            for key, base in bases.items():
                if self._lent.get(key) is base:
                    del self._lent[key]
                    self._free.append(base)
            while self._free and (len(self._free) > self._keep
                                  or sum(b.size for b in self._free) > self._max_bytes):
                del self._free[0]   # the oldest go


BITS = BitsPool()


def reduce_tensor(ref: TensorRef, buffers: _Buffers | None = None, verify: bool = False,
                  bits: np.ndarray | None = None) -> tuple[TensorSums, np.ndarray | None]:
    """The tensor's sums, and its mask as packed bits (None: every entry kept); `bits`: where to pack
    them (ceil(n / 8) bytes), when the tensor has a mask.

    With `verify`, zip members are CRC-checked on the way (`Checksum`), chunk by chunk with the
    reduction, while their bytes are in cache."""
    buffers = buffers or _Buffers()
    # bfloat16 reaches the kernel as stored (uint16), widened in its registers, not in a copy
    raw_bf16 = _raw_bfloat16(ref.weight)
    weight = _flat(ref.weight, raw_bf16)
    if weight.dtype.kind not in "fiubc":
        raise ScanError(ref.path, f"weight has non-numeric dtype {weight.dtype}", tensor=ref.name)
    raw_bf16_mask = _raw_bfloat16(ref.mask)
    mask = None if ref.mask is None else _flat(ref.mask, raw_bf16_mask)
    if mask is not None and mask.dtype.kind not in "fiub":
        raise ScanError(ref.mask_path or ref.path, f"mask has non-numeric dtype {mask.dtype}", tensor=ref.name)
    checks = [c for c in (Checksum.for_array(ref.weight), Checksum.for_array(ref.mask))
              if c is not None] if verify else []
    n = weight.size
    track_zeros = mask is None and len(ref.shape) >= 2  # a mask may be inferred from its zeros
    if mask is None:
        bits = None
    elif bits is None or bits.size != (n + 7) // 8:
        bits = np.empty((n + 7) // 8, dtype=np.uint8)
    try:
        abs_sum, n_unpruned, n_nonzero, bits = _reduce_chunks(weight, mask, ref, buffers, checks,
                                                              track_zeros, bits, raw_bf16, raw_bf16_mask)
    except ScanError as exc:
        if exc.path is None:   # raised below the reader (the memory budget): this tensor's file and name
            raise ScanError(ref.path, exc.message, ref.name) from None
        raise
    if not math.isfinite(abs_sum):
        raise ScanError(ref.path, "weight contains NaN or infinite values", tensor=ref.name)
    if bits is not None and n % 8:  # the last byte's padding bits count as pruned
        bits[-1] &= (0xFF << (8 - n % 8)) & 0xFF
    for array in (ref.weight, ref.mask):
        if hasattr(array, "release"):
            array.release()
    sums = TensorSums(shape=tuple(map(int, ref.shape)), n_params=int(n), masked=mask is not None,
                      n_unpruned=int(n_unpruned if mask is not None else n),
                      n_nonzero=int(n_unpruned if mask is not None else n_nonzero),
                      abs_sum=abs_sum, path=str(ref.path), kind=dtype_kind(ref.weight))
    return sums, bits


def _raw_bfloat16(array) -> bool:
    """A stored bfloat16 array the kernel takes as its raw uint16 bits."""
    return KERNEL is not None and isinstance(array, StoredArray) and is_bfloat16(array.dtype)


def dtype_kind(array: Any) -> str:
    """numpy's dtype kind of a (lazy) array; bfloat16 is floating point."""
    dtype = getattr(array, "dtype", None)
    if dtype is None:
        return "?"
    if isinstance(dtype, np.dtype):   # the common case, without np.dtype()'s parsing
        return dtype.kind
    try:
        return np.dtype(dtype).kind
    except TypeError:
        return "f" if str(dtype) == "bfloat16" else "?"


def _reduce_chunks(weight, mask, ref, buffers, checks, track_zeros, bits, raw_bf16=False,
                   raw_bf16_mask=False):
    """The chunked pass of `reduce_tensor`: (sum |m*w|, ones in the mask, nonzeros, packed bits).
    `raw_bf16`/`raw_bf16_mask`: the weight/mask is bfloat16 as its raw bits (for the kernel).

    Arrays in memory (or mapped) with nothing to checksum go to the kernel in steps of KERNEL_STEP
    elements, the others in chunks of CHUNK (checksums are updated a chunk at a time, and arrays read
    in slices are read a chunk at a time)."""
    codes = _kernel_codes(weight, mask, raw_bf16, raw_bf16_mask)
    in_place = codes is not None and not checks and isinstance(weight, np.ndarray) and (
        mask is None or isinstance(mask, np.ndarray))
    totals = [0.0, 0, 0]
    bits = _reduce_span(weight, mask, ref, buffers, checks, track_zeros, bits, (raw_bf16, raw_bf16_mask), codes,
                        0, weight.size, KERNEL_STEP if in_place else CHUNK, totals)
    for check in checks:
        check.finish()
    return totals[0], totals[1], totals[2], bits


def _reduce_span(weight, mask, ref, buffers, checks, track_zeros, bits, raw, codes, first: int, last: int,
                 step: int, totals: list):
    """Elements [first, last) in steps of `step`, added to `totals` (sum, ones, nonzeros); returns the
    bits. The kernel reduces a step where it can; a step it flags is done again in chunks, and a chunk it
    flags by numpy, so the rules and messages are numpy's alone."""
    n = weight.size
    for start in range(first, last, step):   # steps are multiples of 8: packed chunks concatenate
        stop = min(start + step, last)
        for check in checks:
            check.update(start, stop)
        w = weight[start:stop]
        m = mask[start:stop] if mask is not None else None
        fused = _fused_chunk(w, m, codes, bits, start, stop, track_zeros) if codes is not None else None
        if fused is None and step > CHUNK:
            bits = _reduce_span(weight, mask, ref, buffers, checks, track_zeros, bits, raw, codes, start, stop,
                                CHUNK, totals)
            continue
        if fused is None:
            with np.errstate(invalid="ignore", over="ignore"):  # non-finite sums are reported by the caller
                chunk_sum, ones, nonzero, bits = _numpy_chunk(w, m, ref, buffers, track_zeros, bits, n, start,
                                                              stop, *raw)
        else:
            chunk_sum, ones, nonzero, zeros_bits = fused
            if zeros_bits is not None:
                bits = _with_zero_bits(bits, n, start, stop, zeros_bits)
        totals[0] += chunk_sum
        totals[1] += ones
        totals[2] += nonzero
    return bits


def _numpy_chunk(w, m, ref, buffers, track_zeros, bits, n, start, stop, raw_bf16, raw_bf16_mask):
    """(sum, ones, nonzeros, bits) of one chunk by numpy: the reference path (float32 |w|*m with reused
    buffers, summed in float64)."""
    ones = nonzero = 0
    if raw_bf16:
        w = widen_bfloat16(w)
    if raw_bf16_mask:
        m = widen_bfloat16(m)
    buf = buffers.get(_accumulator(w.dtype), stop - start)
    if w.dtype.kind in "iu":  # widen first: |INT_MIN| does not fit its own type
        np.copyto(buf, w, casting="unsafe")
        np.abs(buf, out=buf)
    else:
        np.abs(w, out=buf, casting="unsafe")
    if m is None:
        nonzero = np.count_nonzero(buf)  # only needed when masks are inferred from zeros
        if track_zeros and nonzero < stop - start:
            bits = _with_zero_bits(bits, n, start, stop, np.packbits(buf != 0))
    else:
        ones, as_bool = _ones(m, ref, buffers)
        bits[start // 8:(stop + 7) // 8] = np.packbits(as_bool)
        np.multiply(buf, m, out=buf, casting="unsafe")
    return float(buf.sum(dtype=np.float64)), ones, nonzero, bits


def _with_zero_bits(bits, n: int, start: int, stop: int, packed: np.ndarray) -> np.ndarray:
    """The nonzero bits of a weight without a mask, with a chunk holding zeros written in; they
    are made at the first such chunk (every earlier entry was nonzero)."""
    if bits is None:
        bits = np.full((n + 7) // 8, 0xFF, dtype=np.uint8)
    bits[start // 8:(stop + 7) // 8] = packed
    return bits


def _kernel_codes(weight, mask, raw_bf16: bool, raw_bf16_mask: bool) -> tuple[str, str] | None:
    """The kernel's dtype codes for this weight and mask, or None (numpy reduces it)."""
    if KERNEL is None:
        return None
    wcode = "bf16" if raw_bf16 else _WEIGHT_CODES.get(weight.dtype)
    mcode = "" if mask is None else "bf16" if raw_bf16_mask else _MASK_CODES.get(mask.dtype)
    return None if wcode is None or mcode is None else (wcode, mcode)


def _fused_chunk(w, m, codes, bits, start, stop, track_zeros):
    """(sum, ones, nonzeros, packed nonzeros when some are zero) of one chunk by the kernel, or None
    when numpy must reduce it (a view the kernel cannot take, or a chunk it flags)."""
    if not (w.flags.c_contiguous and (m is None or m.flags.c_contiguous)):
        return None
    out = bits[start // 8:(stop + 7) // 8] if m is not None else (
        np.empty((stop - start + 7) // 8, dtype=np.uint8) if track_zeros else None)
    chunk_sum, ones, nonzero, status = KERNEL.reduce_chunk(w, codes[0], m, codes[1], out, _ISA)
    if status:
        return None
    zeros_bits = out if m is None and track_zeros and nonzero < stop - start else None
    return chunk_sum, ones, (nonzero if m is None else 0), zeros_bits


def _ones(m: np.ndarray, ref: TensorRef, buffers: _Buffers) -> tuple[int, np.ndarray]:
    """(number of ones, the chunk as bools) of a mask chunk, which must hold only 0 and 1.
    Each dtype takes the fewest passes: bytes are checked by one max (min too when signed) and
    viewed as bools; floats are compared with 1, which gives the bools, and with 0: a mask is
    0/1 exactly when the two counts add up to its size (NaN is neither)."""
    if m.dtype == np.bool_:
        return int(np.count_nonzero(m)), m
    if m.dtype.kind in "iu":  # max/min are cheap SIMD reductions; no temporaries
        if m.size and (m.max() > 1 or (m.dtype.kind == "i" and m.min() < 0)):
            _not_binary(m, ref)
        return int(np.count_nonzero(m)), m.view(np.bool_) if m.dtype.itemsize == 1 else m != 0
    # counted by ufunc reductions, which release the GIL (count_nonzero holds it): threads scale
    is_one = np.equal(m, 1, out=buffers.get(np.dtype(np.bool_), m.size))
    # a second bool scratch buffer: the buffers are kept one per dtype, so it borrows the int8 one
    is_zero = np.equal(m, 0, out=buffers.get(np.dtype(np.int8), m.size).view(np.bool_))
    ones = int(np.add.reduce(is_one.view(np.uint8), dtype=np.int64))
    if ones + int(np.add.reduce(is_zero.view(np.uint8), dtype=np.int64)) != m.size:
        _not_binary(m, ref)
    return ones, is_one


def _not_binary(m: np.ndarray, ref: TensorRef):
    bad = m[(m != 0) & (m != 1)][0]
    raise ScanError(ref.mask_path or ref.path, f"mask is not 0/1 (found value {bad!r})", tensor=ref.name)


def open_tensors(round: Round, opts: NameOptions) -> tuple[list[TensorRef], dict[str, float], list[str]]:
    """The canonical tensors of a round, metrics found inside its files, and notes on reading."""
    raw = registry.get(round.reader).open_round(round)
    return names.pair(raw, opts), dict(raw.metrics), list(raw.notes)


def reduce_round(round: Round, opts: NameOptions, verify: bool = False) -> RoundSums:
    """The round's sums; of its `round.part` only, when it is reduced in parts (`merge_parts`)."""
    refs, metrics, notes = open_tensors(round, opts)
    if not refs:
        raise ScanError(round.files[0] if round.files else None,
                        "no tensors found" + (f" under --select {opts.select!r}" if opts.select else ""))
    refs = part_of(refs, *round.part)
    buffers = _Buffers()
    sums, bits = {}, {}
    # the packed masks of the whole round in one buffer of the pool, a view a tensor with a mask
    sizes = [(math.prod(ref.shape) + 7) // 8 if ref.mask is not None else 0 for ref in refs]
    ends = np.cumsum(sizes).tolist()
    round_bits = BITS.take(ends[-1]) if ends and ends[-1] else None
    try:
        for ref, size, end in zip(refs, sizes, ends):
            out = round_bits[end - size:end] if size else None
            sums[ref.name], packed = reduce_tensor(ref, buffers, verify, out)
            if packed is not None:
                bits[ref.name] = packed
    finally:   # a file that shrank meanwhile read zeros: that, not what they led to, is the error
        for file in {a.storage.file for r in refs for a in (r.weight, r.mask) if isinstance(a, StoredArray)}:
            file.check_intact()
    return RoundSums(round.index, sums, metrics, bits, tuple(notes))


def part_of(refs: list[TensorRef], k: int, parts: int) -> list[TensorRef]:
    """The k-th of `parts` runs of consecutive tensors, of about equal numbers of elements (weights
    and masks): each tensor goes to the part its first element falls in. A part may be empty."""
    if parts <= 1:
        return refs
    sizes = [math.prod(ref.shape) * (2 if ref.mask is not None else 1) for ref in refs]
    total, start, chosen = max(1, sum(sizes)), 0, []
    for ref, size in zip(refs, sizes):
        if start * parts // total == k:
            chosen.append(ref)
        start += size
    return chosen


def merge_parts(outcomes: list) -> Any:
    """One round's outcome from its parts' (in part order): their sums in file order, or the first
    part's error."""
    failed = next((o for o in outcomes if not isinstance(o, RoundSums)), None)
    if failed is not None or len(outcomes) == 1:
        return failed if failed is not None else outcomes[0]
    first = outcomes[0]
    return RoundSums(first.index, {k: v for o in outcomes for k, v in o.tensors.items()}, first.metrics,
                     {k: v for o in outcomes for k, v in o.bits.items()}, first.notes)


def survival_counts(before: np.ndarray | None, after: np.ndarray | None, n: int,
                    kept_before: int | None = None, kept_after: int | None = None) -> tuple[int, int, int]:
    """(kept before, kept before and after, kept after) between two masks as packed bits; the
    counts of each mask alone may be passed in when known (TensorSums.kept)."""
    n_before = n if before is None else kept_before if kept_before is not None else popcount(before)
    n_after = n if after is None else kept_after if kept_after is not None else popcount(after)
    if before is None or after is None:
        return n_before, (n_after if before is None else n_before), n_after
    return n_before, count_both(before, after), n_after


def count_both(a: np.ndarray, b: np.ndarray) -> int:
    """Bits set in both packed masks: the kernel counts them in one pass, numpy through a & b."""
    if KERNEL is not None and a.flags.c_contiguous and b.flags.c_contiguous:
        return KERNEL.count_both(a, b)
    return popcount(a & b)


def popcount(packed: np.ndarray) -> int:
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return int(np.bitwise_count(packed).sum(dtype=np.int64))
    return int(np.unpackbits(packed).sum(dtype=np.int64))
