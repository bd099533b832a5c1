"""The map step: one round's checkpoint in, a few numbers per tensor out.

Every tensor of the round is reduced, chunk by chunk with reused buffers (float32 |w|*m summed
in float64), and checked: masks must be 0/1 and weights finite. Blocks and the prunable set
are applied afterwards, so results can be cached per round and regrouped without rereading.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from flowscan.errors import ScanError
from flowscan.readers import names, registry
from flowscan.readers.base import NameOptions, Round, TensorRef

CHUNK = 1 << 18  # elements; 1 MiB float32 buffers stay in cache (measured fastest)


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


@dataclass(frozen=True)
class RoundSums:
    index: int
    tensors: dict[str, TensorSums]   # file order
    metrics: dict[str, float]     # found inside the round's files

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "metrics": self.metrics,
                "tensors": [{"name": k, **asdict(v)} for k, v in self.tensors.items()]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RoundSums":
        tensors = {}
        for t in data["tensors"]:
            t = dict(t)
            name = t.pop("name")
            t["shape"] = tuple(t["shape"])
            tensors[name] = TensorSums(**t)
        return cls(data["index"], tensors, dict(data["metrics"]))


class _Buffers:
    """Scratch buffers reused across tensors (fresh large allocations are slow)."""

    def __init__(self):
        self._bufs: dict[np.dtype, np.ndarray] = {}

    def get(self, dtype: np.dtype, n: int) -> np.ndarray:
        buf = self._bufs.get(dtype)
        if buf is None or buf.size < n:
            buf = self._bufs[dtype] = np.empty(max(n, CHUNK), dtype=dtype)
        return buf[:n]


def _flat(array: Any) -> np.ndarray:
    arr = np.asarray(array)
    return arr.reshape(-1)


def reduce_tensor(ref: TensorRef, buffers: _Buffers | None = None) -> TensorSums:
    buffers = buffers or _Buffers()
    weight = _flat(ref.weight)
    if weight.dtype.kind not in "fiub":
        raise ScanError(ref.path, f"weight has non-numeric dtype {weight.dtype}", tensor=ref.name)
    acc = np.dtype(np.float64 if weight.dtype == np.float64 else np.float32)
    mask = _flat(ref.mask) if ref.mask is not None else None
    if mask is not None and mask.dtype.kind not in "fiub":
        raise ScanError(ref.mask_path or ref.path, f"mask has non-numeric dtype {mask.dtype}", tensor=ref.name)
    n = weight.size
    abs_sum, n_unpruned, n_nonzero = 0.0, 0, 0
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        buf = buffers.get(acc, stop - start)
        np.abs(weight[start:stop], out=buf, casting="unsafe")
        if mask is None:
            n_nonzero += np.count_nonzero(buf)  # only needed when masks are inferred from zeros
        else:
            m = mask[start:stop]
            n_unpruned += _count_ones(m, ref)
            np.multiply(buf, m, out=buf, casting="unsafe")
        abs_sum += float(buf.sum(dtype=np.float64))
    if not math.isfinite(abs_sum):
        raise ScanError(ref.path, "weight contains NaN or infinite values", tensor=ref.name)
    for array in (ref.weight, ref.mask):
        if hasattr(array, "release"):
            array.release()
    return TensorSums(shape=tuple(int(s) for s in ref.shape), n_params=int(n), masked=mask is not None,
                      n_unpruned=int(n_unpruned if mask is not None else n),
                      n_nonzero=int(n_unpruned if mask is not None else n_nonzero),
                      abs_sum=abs_sum, path=str(ref.path))


def _count_ones(m: np.ndarray, ref: TensorRef) -> int:
    """Number of ones in a mask chunk, which must hold only 0 and 1."""
    if m.dtype == np.bool_:
        return int(np.count_nonzero(m))
    if m.dtype.kind in "iu":  # min/max are cheap SIMD reductions; no temporaries
        if m.size and (m.max() > 1 or m.min() < 0):
            _not_binary(m, ref)
        return int(np.count_nonzero(m))
    ones = int(np.count_nonzero(m == 1))
    if np.count_nonzero(m) != ones:
        _not_binary(m, ref)
    return ones


def _not_binary(m: np.ndarray, ref: TensorRef):
    bad = m[(m != 0) & (m != 1)][0]
    raise ScanError(ref.mask_path or ref.path, f"mask is not 0/1 (found value {bad!r})", tensor=ref.name)


def open_tensors(round: Round, opts: NameOptions) -> tuple[list[TensorRef], dict[str, float]]:
    """The canonical tensors of a round, and metrics found inside its files."""
    raw = registry.get(round.reader).open_round(round)
    return names.pair(raw, opts), dict(raw.metrics)


def reduce_round(round: Round, opts: NameOptions) -> RoundSums:
    refs, metrics = open_tensors(round, opts)
    if not refs:
        raise ScanError(round.files[0] if round.files else None,
                        "no tensors found" + (f" under --select {opts.select!r}" if opts.select else ""))
    buffers = _Buffers()
    sums = {ref.name: reduce_tensor(ref, buffers) for ref in refs}
    return RoundSums(round.index, sums, metrics)
