"""One round of training under a mask, fast on a GPU and correct on a CPU.

On CUDA: data already on the GPU, bf16 autocast, channels_last, CUDA graphs through
torch.compile(mode="reduce-overhead") when it works (else eager), a fused SGD step and one
foreach multiply re-applying the masks after every step. The learning-rate schedule is a
function of the global step, so rewinding to step k continues it from k.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from flowscan.train.data import Dataset, random_crop_flip


def resolve_device(name: str) -> torch.device:
    """A torch device from a command's --device: auto is a GPU when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class TrainConfig:
    steps: int                 # total steps of a full training run (round 0)
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    optimizer: str = "sgd"     # or "adamw"
    warmup: int = 0            # linear warm-up steps, then cosine decay to 0
    augment: bool = False      # random crops (pad 4) and horizontal flips, on the device
    compile: bool = True       # CUDA graphs via torch.compile on CUDA; ignored on CPU

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """Trains one model under its masks; keeps the compiled step across rounds."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor], data: Dataset, cfg: TrainConfig,
                 device: torch.device):
        self.model, self.data, self.cfg, self.device = model, data, cfg, device
        self.cuda = device.type == "cuda"
        if self.cuda and data.kind == "image":
            self.model = self.model.to(memory_format=torch.channels_last)
        params = dict(self.model.named_parameters())
        self.masked_params = [params[n] for n in masks]
        self.set_masks(masks)
        self.forward = self.model
        if self.cuda and cfg.compile:
            try:
                self.forward = torch.compile(self.model, mode="reduce-overhead")
            except Exception:  # noqa: BLE001 - any compile failure: eager is correct, just slower
                self.forward = self.model

    def set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        self.masks = [masks[n].to(self.device, dtype=self.masked_params[0].dtype) for n in masks]
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        torch._foreach_mul_(self.masked_params, self.masks)

    def _optimizer(self):
        decay = [p for p in self.model.parameters() if p.dim() > 1]
        other = [p for p in self.model.parameters() if p.dim() <= 1]
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
        if self.cfg.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=self.cfg.lr, fused=self.cuda or None)
        return torch.optim.SGD(groups, lr=self.cfg.lr, momentum=self.cfg.momentum, nesterov=self.cfg.momentum > 0,
                               fused=self.cuda or None)

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        if self.cuda and self.data.kind == "image":
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _batches(self, seed: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        """The training batches of one data order: shuffled per epoch by a CPU generator seeded
        with `seed` (reproducible), augmented on the device with the same generator."""
        generator = torch.Generator().manual_seed(seed)
        x_all, y_all = self.data.x_train, self.data.y_train
        n = len(y_all)
        batch = min(self.cfg.batch_size, n)
        order, cursor = None, n

        def next_batch():
            nonlocal order, cursor
            if cursor + batch > n:  # a new epoch: reshuffle
                order, cursor = torch.randperm(n, generator=generator).to(x_all.device), 0
            idx = order[cursor: cursor + batch]
            cursor += batch
            x, y = x_all[idx], y_all[idx]
            if self.cfg.augment and self.data.kind == "image":
                x = random_crop_flip(x, generator)
            return x, y
        return next_batch

    def _losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss to minimise (a scalar here; one per model when packed)."""
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda):
            return F.cross_entropy(self.forward(self._inputs(x)), y)

    def _run_steps(self, start: int, stop: int, next_batch, progress) -> tuple[torch.Tensor | None, float]:
        """Steps start..stop-1 of the schedule: (the recorded losses stacked, seconds)."""
        self.model.train()
        opt = self._optimizer()
        losses = []
        if self.cuda:
            torch.cuda.synchronize()
        began = time.perf_counter()
        for step in range(start, stop):
            x, y = next_batch()
            for group in opt.param_groups:
                group["lr"] = self.cfg.lr_at(step)
            each = self._losses(x, y)
            opt.zero_grad(set_to_none=True)
            each.sum().backward()
            opt.step()
            self.apply_masks()
            if step % 50 == 0 or step == stop - 1:
                losses.append(each.detach().float().clone())  # CUDA graph outputs are reused
            if progress:
                progress(1)
        if self.cuda:
            torch.cuda.synchronize()
        return (torch.stack(losses) if losses else None), time.perf_counter() - began

    def train(self, start: int, stop: int, seed: int, progress: Callable[[int], None] | None = None) -> dict:
        """Steps start..stop-1 of the schedule; returns cost and the mean training loss."""
        losses, seconds = self._run_steps(start, stop, self._batches(seed), progress)
        batch = min(self.cfg.batch_size, len(self.data.y_train))
        return {"train_steps": stop - start, "train_seconds": seconds, "train_images": (stop - start) * batch,
                "train_loss": float(losses.mean()) if losses is not None else float("nan")}

    @torch.no_grad()
    def evaluate(self, batch_size: int = 1000) -> dict:
        self.model.eval()
        correct, loss, n = 0, 0.0, len(self.data.y_test)
        for start in range(0, n, batch_size):
            x = self._inputs(self.data.x_test[start: start + batch_size])
            y = self.data.y_test[start: start + batch_size]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda):
                logits = self.model(x).float()
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
        return {"test_accuracy": correct / n, "test_loss": loss / n}
