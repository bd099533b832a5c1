"""Magnitude pruning: which surviving weights go in the next round.

Exactly k weights are pruned (ties broken by position, so the same weights always give the same
mask): `global` ranks every prunable weight together (k = fraction x remaining), `original`
likewise with k = fraction x the original count (BERT tickets), `layerwise` ranks each tensor
separately.
"""

from __future__ import annotations

from typing import Mapping

import torch

SCHEDULES = ("global", "original", "layerwise")


def _prune_smallest(magnitudes: torch.Tensor, alive: torch.Tensor, k: int) -> torch.Tensor:
    """New alive flags (flat) with the k smallest alive magnitudes removed."""
    k = max(0, min(int(k), int(alive.sum())))
    if k == 0:
        return alive.clone()
    keyed = torch.where(alive, magnitudes, torch.full_like(magnitudes, float("inf")))
    order = torch.sort(keyed, stable=True).indices  # stable: ties go by position
    out = alive.clone()
    out[order[:k]] = False
    return out


def next_masks(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], fraction: float,
               schedule: str = "global", original: int | None = None) -> dict[str, torch.Tensor]:
    """Masks of the next round (bool) from this round's trained weights and masks."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    names = list(masks)
    if schedule == "layerwise":
        out = {}
        for n in names:
            alive = masks[n].flatten().bool()
            k = round(fraction * int(alive.sum()))
            out[n] = _prune_smallest(weights[n].detach().abs().flatten().float(), alive, k).view_as(masks[n])
        return out
    magnitudes = torch.cat([weights[n].detach().abs().flatten().float() for n in names])
    alive = torch.cat([masks[n].flatten().bool() for n in names])
    total = original if original is not None else alive.numel()
    k = round(fraction * (total if schedule == "original" else int(alive.sum())))
    flat = _prune_smallest(magnitudes, alive, k)
    out, offset = {}, 0
    for n in names:
        size = masks[n].numel()
        out[n] = flat[offset: offset + size].view_as(masks[n])
        offset += size
    return out
