"""Linear mode connectivity between successive IMP rounds (Paul et al.).

The linear path (the paper's, the default): theta(alpha) = (1 - alpha) theta_n + alpha theta_{n+1},
each end carrying its own mask (pruned entries are zeros) and nothing re-masked in the interior,
so the entries pruned between n and n+1 shrink linearly to zero. The projected path
(`projected=True`) masks the interior with mask n+1: at alpha = 0+ it is theta_n pruned in one
shot, so its barrier measures pruning damage, not the landscape. BatchNorm statistics are
re-estimated on training data at every alpha.

barrier = max_alpha err(alpha) - ((1 - alpha) err(0) + alpha err(1))   (above the chord)
instability = max_alpha err(alpha) - (err(0) + err(1)) / 2             (Frankle et al.)

The chord uses the path's own ends: for a network without BatchNorm they are the rounds as stored
(their errors, measured when the rounds were loaded, are reused rather than evaluated again);
with BatchNorm they carry re-estimated statistics like every interior point, and may differ from
the stored networks' errors (the landscape table records both).

Speed: the stored ends are not evaluated again (above), and a convolutional network is evaluated
with its weights and the test images in channels-last layout, which oneDNN runs about twice as
fast on the CPU as the default layout (the same test errors; losses agree to float32 rounding,
about 1e-7). Evaluating the points of a segment together (vmapped over stacked weights) was
measured too: as fast for an MLP, and slower than one point at a time for LeNet-5, so each point
is evaluated alone.
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


# no_grad, not inference_mode: the weights made channels-last here and the cached images serve
# autograd later (sharpness's Hessian)
@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch_size: int = 500) -> tuple[float, float]:
    """(test error, mean test loss)."""
    model.eval()
    x_test = data.x_test
    if x_test.dim() == 4 and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model.to(memory_format=torch.channels_last)   # weights only: the state dict is unchanged
        x_test = _channels_last(data)
    wrong, loss, n = 0, 0.0, len(data.y_test)
    for i in range(0, n, batch_size):
        logits = model(x_test[i:i + batch_size]).float()
        y = data.y_test[i:i + batch_size]
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        wrong += int((logits.argmax(1) != y).sum())
    return wrong / n, loss / n


_LAYOUTS: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _channels_last(data: Dataset) -> torch.Tensor:
    """The test images in channels-last layout, made once per dataset (a copy of the test set)."""
    key = id(data.x_test)
    held = _LAYOUTS.get(key)
    if held is None or held[0] is not data.x_test:
        _LAYOUTS.clear()   # one dataset at a time: the last one's copy goes
        held = _LAYOUTS[key] = (data.x_test, data.x_test.contiguous(memory_format=torch.channels_last))
    return held[1]


def point_state(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], alpha: float,
                end_masks: dict[str, torch.Tensor], projected: bool = False) -> dict[str, torch.Tensor]:
    """The state at `alpha` on the segment (see the module docstring for `projected`)."""
    state = {}
    for k, a in start.items():
        b = end[k]
        state[k] = (1 - alpha) * a + alpha * b if a.is_floating_point() else b
        if projected and k in end_masks and 0 < alpha < 1:
            state[k] = state[k] * end_masks[k]
    return state


@torch.no_grad()
def interpolate(model: nn.Module, start: dict[str, torch.Tensor], end: dict[str, torch.Tensor],
                end_masks: dict[str, torch.Tensor], data: Dataset, alphas, bn_batches: int = 20,
                projected: bool = False, ends: tuple[tuple[float, float], tuple[float, float]] | None = None,
                progress=None) -> Curve:
    """Errors along the segment between two state dicts (masks already applied at both ends).
    `ends`: the (error, loss) of the stored start and end networks, used for alpha = 0 and 1 when
    the model has no BatchNorm (there the path's ends are those networks). `progress(text)` hears
    of each point."""
    alphas = np.asarray(alphas, dtype=np.float64)
    results: dict[int, tuple[float, float]] = {}
    batchnorm = has_batchnorm(model)
    if ends is not None and not batchnorm:
        for k, alpha in enumerate(alphas):
            if alpha in (0.0, 1.0):
                results[k] = ends[0] if alpha == 0.0 else ends[1]
    todo = [k for k in range(len(alphas)) if k not in results]
    for n, k in enumerate(todo, 1):
        model.load_state_dict(point_state(start, end, alphas[k], end_masks, projected))
        if batchnorm:
            reestimate_batchnorm(model, data, bn_batches)
        results[k] = evaluate(model, data)
        if progress:
            progress(f"alpha {alphas[k]:.2f} ({n}/{len(todo)}): error {results[k][0]:.4f}")
    return Curve(alphas, np.array([results[k][0] for k in range(len(alphas))]),
                 np.array([results[k][1] for k in range(len(alphas))]))


def alpha_grid(points: int = 11) -> np.ndarray:
    return np.linspace(0.0, 1.0, points)
