"""Linear mode connectivity between successive IMP rounds (Paul et al.).

The linear path (the paper's, the default): theta(alpha) = (1 - alpha) theta_n + alpha theta_{n+1},
each end carrying its own mask (pruned entries are zeros) and nothing re-masked in the interior,
so the entries pruned between n and n+1 shrink linearly to zero. The projected path
(`projected=True`) masks the interior with mask n+1: at alpha = 0+ it is theta_n pruned in one
shot, so its barrier measures pruning damage, not the landscape. BatchNorm statistics are
re-estimated on training data at every alpha.

barrier = max_alpha err(alpha) - ((1 - alpha) err(0) + alpha err(1))   (above the chord)
instability = max_alpha err(alpha) - (err(0) + err(1)) / 2             (Frankle et al.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from flowscan.train.data import Dataset


@dataclass
class Curve:
    alphas: np.ndarray
    errors: np.ndarray
    losses: np.ndarray

    @property
    def barrier(self) -> float:
        line = (1 - self.alphas) * self.errors[0] + self.alphas * self.errors[-1]
        return float(np.max(self.errors - line))

    @property
    def loss_barrier(self) -> float:
        line = (1 - self.alphas) * self.losses[0] + self.alphas * self.losses[-1]
        return float(np.max(self.losses - line))

    @property
    def instability(self) -> float:
        return float(np.max(self.errors) - (self.errors[0] + self.errors[-1]) / 2)

    @property
    def loss_instability(self) -> float:
        return float(np.max(self.losses) - (self.losses[0] + self.losses[-1]) / 2)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, data: Dataset, batches: int = 20, batch_size: int = 256,
                         seed: int = 0) -> None:
    """Fresh running statistics (a cumulative average) from training batches, transformed as the
    recipe trained them (e.g. random crops and flips for open_lth's and Chen et al.'s CIFAR)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    g = torch.Generator().manual_seed(seed)
    n = len(data.y_train)
    for _ in range(batches):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=g).to(data.x_train.device)
        model(data.training_batch(idx, g))   # the recipe's training transform, as in training
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch_size: int = 1000) -> tuple[float, float]:
    """(test error, mean test loss)."""
    model.eval()
    wrong, loss, n = 0, 0.0, len(data.y_test)
    for i in range(0, n, batch_size):
        logits = model(data.x_test[i:i + batch_size]).float()
        y = data.y_test[i:i + batch_size]
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        wrong += int((logits.argmax(1) != y).sum())
    return wrong / n, loss / n


@torch.no_grad()
def interpolate(model: nn.Module, start: dict[str, torch.Tensor], end: dict[str, torch.Tensor],
                end_masks: dict[str, torch.Tensor], data: Dataset, alphas, bn_batches: int = 20,
                projected: bool = False) -> Curve:
    """Errors along the segment between two state dicts (masks already applied at both ends);
    `projected` masks the interior with `end_masks` (see the module docstring)."""
    errors, losses = [], []
    for alpha in alphas:
        state = {}
        for k, a in start.items():
            b = end[k]
            state[k] = (1 - alpha) * a + alpha * b if a.is_floating_point() else b
            if projected and k in end_masks and 0 < alpha < 1:
                state[k] = state[k] * end_masks[k]
        model.load_state_dict(state)
        if has_batchnorm(model):
            reestimate_batchnorm(model, data, bn_batches)
        err, loss = evaluate(model, data)
        errors.append(err)
        losses.append(loss)
    return Curve(np.asarray(alphas, dtype=np.float64), np.asarray(errors), np.asarray(losses))


def alpha_grid(points: int = 11) -> np.ndarray:
    return np.linspace(0.0, 1.0, points)
