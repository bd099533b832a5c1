"""Sharpness: the top eigenvalue of the training-loss Hessian at the end of a round.

Power iteration on Hessian-vector products (double backward) over a fixed subset of training
data, in the subspace of unpruned weights (pruned coordinates are held at zero), until the
eigenvalue estimate changes by less than `tol` (relative).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from flowscan.train.lmc import has_batchnorm, reestimate_batchnorm
from flowscan.train.data import Dataset


@dataclass
class TopEigen:
    value: float
    iterations: int
    converged: bool


def _subset(data: Dataset, size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.y_train), generator=g)[:size].to(data.x_train.device)
    return data.x_train[idx], data.y_train[idx]


def top_eigenvalue(model: nn.Module, data: Dataset, masks: dict[str, torch.Tensor], subset: int = 512,
                   tol: float = 1e-3, max_iter: int = 100, seed: int = 0, batch_size: int = 256) -> TopEigen:
    """Largest Hessian eigenvalue of the mean training loss on `subset` examples (BN in eval mode)."""
    if has_batchnorm(model):
        reestimate_batchnorm(model, data)
    model.eval()  # a fixed function: BatchNorm uses its (re-estimated) running statistics
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    mask = [masks.get(n, torch.ones_like(p, dtype=torch.bool)).to(p.device, p.dtype) for n, p in named]
    x, y = _subset(data, min(subset, len(data.y_train)), seed)

    def hvp(vec):
        out = [torch.zeros_like(p) for p in params]
        for i in range(0, len(y), batch_size):
            loss = F.cross_entropy(model(x[i:i + batch_size]), y[i:i + batch_size], reduction="sum") / len(y)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            dot = sum((g * v).sum() for g, v in zip(grads, vec))
            for o, h in zip(out, torch.autograd.grad(dot, params)):
                o.add_(h)
        return [o * m for o, m in zip(out, mask)]

    g = torch.Generator().manual_seed(seed + 1)
    vec = [torch.randn(p.shape, generator=g).to(p.device) * m for p, m in zip(params, mask)]
    value = 0.0
    for it in range(1, max_iter + 1):
        norm = torch.sqrt(sum((v * v).sum() for v in vec))
        vec = [v / norm for v in vec]
        hv = hvp(vec)
        new = float(sum((h * v).sum() for h, v in zip(hv, vec)))  # Rayleigh quotient
        vec = [h.detach() for h in hv]
        if it > 1 and abs(new - value) <= tol * max(abs(new), 1e-12):
            return TopEigen(new, it, True)
        value = new
    return TopEigen(value, max_iter, False)
