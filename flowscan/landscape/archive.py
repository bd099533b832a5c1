"""Rounds of an archive as (state dict, masks) for a model, through the scanner's readers.

The model and dataset come from a `produce` manifest when there is one, else from the user
(`--model cifar-resnet20` or `--model package.module:function`, and `--data`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from flowscan import layout
from flowscan.errors import FlowscanError
from flowscan.readers.base import NameOptions, Run
from flowscan.reduce import open_tensors


@dataclass
class RoundState:
    index: int
    state: dict[str, torch.Tensor]     # the trained tensors of the round (masks not yet applied)
    masks: dict[str, torch.Tensor]     # bool, for the tensors that carry a stored mask
    metrics: dict[str, float]


def produce_args(run: Run) -> dict | None:
    return layout.run_args(run.path)


def build_model(spec: str, input_shape, n_classes: int) -> torch.nn.Module:
    """A flowscan model name, or `package.module:function` returning an nn.Module (your code)."""
    if ":" in spec:
        module, _, func = spec.partition(":")
        try:
            return getattr(importlib.import_module(module), func)()
        except (ImportError, AttributeError) as exc:
            raise FlowscanError(f"--model {spec}: {exc}") from None
    from flowscan.train.models import build

    try:
        return build(spec, input_shape, n_classes)[0]
    except ValueError as exc:
        raise FlowscanError(str(exc)) from None


def iter_rounds(run: Run, names: NameOptions = NameOptions(), indices=None) -> Iterator[RoundState]:
    """One round at a time (a model's worth of tensors in memory); only `indices` where given."""
    for rnd in run.rounds:
        if indices is not None and rnd.index not in indices:
            continue
        refs, metrics, _notes = open_tensors(rnd, names)
        state = {r.name: torch.from_numpy(np.array(r.weight)) for r in refs}  # a copy, off the memory map
        masks = {r.name: torch.from_numpy(np.asarray(r.mask) != 0) for r in refs if r.mask is not None}
        yield RoundState(rnd.index, state, masks, {**metrics, **rnd.metrics})


def load_into(model: torch.nn.Module, rs: RoundState, device) -> dict[str, torch.Tensor]:
    """Load a round into the model (masks applied); returns the masks on the device by parameter."""
    own = model.state_dict()
    missing = [k for k in own if k not in rs.state and not k.endswith("num_batches_tracked")]
    if missing:
        raise FlowscanError(f"round {rs.index}: the archive lacks {len(missing)} of the model's tensors "
                            f"(e.g. {', '.join(missing[:3])}); wrong --model, or a prefix (--select)?")
    state = {k: rs.state[k].to(own[k].dtype) if k in rs.state else own[k] for k in own}
    for k, m in rs.masks.items():
        if k in state:
            state[k] = state[k] * m
    model.load_state_dict(state)
    return {k: m.to(device) for k, m in rs.masks.items() if k in own}
