"""Masks a ticket is compared with, and how much two tickets overlap. Pure numpy on dicts of
bool arrays (name -> mask); every random mask keeps exactly the requested number of weights.

- `random_global`: the same total count, spread uniformly over every prunable weight;
- `random_per_tensor`: each tensor keeps the ticket's count, at uniformly random positions;
- `shuffled_per_unit`: each output unit (row of a weight: an output channel of a convolution,
  an output feature of a linear layer) keeps its own count, at random positions within the
  row. This is finer than shuffling within a tensor, which is the same distribution as
  `random_per_tensor` and so would add nothing: shuffling within units keeps each neuron's
  fan-in as well as each layer's density, and loses only which inputs survive.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

Masks = Mapping[str, np.ndarray]


def kept(masks: Masks) -> int:
    return sum(int(np.count_nonzero(m)) for m in masks.values())


def size(masks: Masks) -> int:
    return sum(int(m.size) for m in masks.values())


def density(masks: Masks) -> float:
    total = size(masks)
    return kept(masks) / total if total else float("nan")


def random_global(shapes: Mapping[str, tuple[int, ...]], n_kept: int,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """`n_kept` weights chosen uniformly over all tensors together."""
    sizes = [int(np.prod(s)) for s in shapes.values()]
    total = sum(sizes)
    if not 0 <= n_kept <= total:
        raise ValueError(f"cannot keep {n_kept} of {total} weights")
    flat = np.zeros(total, dtype=bool)
    flat[rng.choice(total, size=n_kept, replace=False)] = True
    out, offset = {}, 0
    for (name, shape), n in zip(shapes.items(), sizes):
        out[name] = flat[offset: offset + n].reshape(shape)
        offset += n
    return out


def random_per_tensor(masks: Masks, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Each tensor keeps as many weights as in `masks`, at uniformly random positions."""
    out = {}
    for name, m in masks.items():
        flat = np.zeros(m.size, dtype=bool)
        flat[rng.choice(m.size, size=int(np.count_nonzero(m)), replace=False)] = True
        out[name] = flat.reshape(m.shape)
    return out


def shuffled_per_unit(masks: Masks, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Each output unit's mask permuted within the unit (first axis = output units)."""
    out = {}
    for name, m in masks.items():
        rows = np.asarray(m, dtype=bool).reshape(m.shape[0], -1) if m.ndim else np.asarray(m).reshape(1, 1)
        out[name] = rng.permuted(rows, axis=1).reshape(m.shape)
    return out


def overlap(a: Masks, b: Masks) -> dict[str, float]:
    """How far two tickets agree, against what chance gives.

    `both` weights are kept by both; `overlap` = both / kept(a); `chance` = the expected
    overlap if b's kept weights lay at random within each tensor (its per-tensor counts kept):
    sum over tensors of kept_a * kept_b / size, over kept(a). `jaccard` = both / kept by either."""
    names = [n for n in a if n in b]
    both = sum(int(np.count_nonzero(a[n] & b[n])) for n in names)
    ka = sum(int(np.count_nonzero(a[n])) for n in names)
    kb = sum(int(np.count_nonzero(b[n])) for n in names)
    expected = sum(np.count_nonzero(a[n]) * np.count_nonzero(b[n]) / a[n].size for n in names if a[n].size)
    either = ka + kb - both
    return {"kept_a": float(ka), "kept_b": float(kb), "both": float(both),
            "overlap": both / ka if ka else float("nan"),
            "chance": float(expected) / ka if ka else float("nan"),
            "jaccard": both / either if either else float("nan")}
