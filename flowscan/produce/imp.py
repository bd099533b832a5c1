"""Iterative magnitude pruning for one seed, round by round, resumable.

Round n: train the rewound weights under mask n, evaluate, write the round (atomically), then
prune to mask n+1. Everything a round needs is a function of (seed, round, rewind weights,
mask n), so a run killed at any moment and started again with the same arguments resumes
after its last complete round and ends with the same archive.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from flowscan import layout
from flowscan.errors import FlowscanError
from flowscan.io.atomic import atomic_path
from flowscan.produce import models, pruning
from flowscan.produce.data import Dataset
from flowscan.produce.train import TrainConfig, Trainer

REWIND_FILE = "rewind.safetensors"


@dataclass(frozen=True)
class IMPConfig:
    model: str
    data: str
    rounds: int
    prune_fraction: float = 0.2
    schedule: str = "global"
    rewind: float = 0.0          # < 1: fraction of training; >= 1: a step count; 0: initialization
    epochs: float = 10.0
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    warmup_epochs: float = 0.0
    augment: bool = False
    exclude: str | None = None   # regex of otherwise prunable tensors to leave dense

    def manifest_args(self, seed: int) -> dict:
        return {**asdict(self), "seed": seed}


@dataclass
class RoundReport:
    seed: int
    round: int
    density: float
    metrics: dict = field(default_factory=dict)


def steps_per_epoch(cfg: IMPConfig, data: Dataset) -> int:
    return max(1, len(data.y_train) // min(cfg.batch_size, len(data.y_train)))


def rewind_step(cfg: IMPConfig, total: int) -> int:
    if cfg.rewind < 0:
        raise FlowscanError("--rewind must be >= 0")
    return int(round(cfg.rewind * total)) if cfg.rewind < 1 else min(int(cfg.rewind), total)


def _numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """A copy of the model's state: on the CPU, .numpy() would share memory with the live
    parameters, and training would then move the saved rewind point too."""
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().numpy().copy()
            for k, v in model.state_dict().items()}


def _load_state(model: torch.nn.Module, state: dict[str, np.ndarray], device) -> None:
    model.load_state_dict({k: torch.from_numpy(np.array(v)).to(device) for k, v in state.items()})


def check_or_write_manifest(run: Path, args: dict) -> None:
    """Refuse to mix runs: an existing folder must have been made with the same arguments."""
    path = run / layout.RUN_MANIFEST
    if path.is_file():
        old = layout.read_json(path).get("args", {})
        if old != args:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {args.get(k)!r}" for k in sorted(set(old) | set(args))
                             if old.get(k) != args.get(k))
            raise FlowscanError(f"{run} holds a run made with other arguments ({diff}); "
                                "use another output folder or the same arguments to resume")
        return
    layout.write_run_manifest(run, args)


def run_seed(cfg: IMPConfig, seed: int, run: Path, data: Dataset, device: torch.device, compile: bool = True,
             on_round: Callable[[RoundReport], None] | None = None,
             progress: Callable[[str, int], Callable[[int], None]] | None = None) -> list[RoundReport]:
    """All rounds of one seed into `run` (resuming after its last complete round)."""
    run.mkdir(parents=True, exist_ok=True)
    check_or_write_manifest(run, cfg.manifest_args(seed))
    torch.manual_seed(seed)
    model, spec = models.build(cfg.model, data.input_shape, data.n_classes)
    if spec.kind != data.kind:
        raise FlowscanError(f"model {cfg.model} takes {spec.kind} but dataset {data.name} has {data.kind}")
    model = model.to(device)
    names = models.prunable_names(model, spec, cfg.exclude)
    if not names:
        raise FlowscanError(f"model {cfg.model}: no prunable tensors (check --exclude)")
    params = dict(model.named_parameters())
    per_epoch = steps_per_epoch(cfg, data)
    total = max(1, int(round(cfg.epochs * per_epoch)))
    start = rewind_step(cfg, total)
    tcfg = TrainConfig(steps=total, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                       weight_decay=cfg.weight_decay, optimizer=cfg.optimizer,
                       warmup=int(cfg.warmup_epochs * per_epoch), augment=cfg.augment, compile=compile)
    original = sum(params[n].numel() for n in names)

    done = layout.complete_rounds(run)
    if [i for i, _ in done] != list(range(len(done))):
        raise FlowscanError(f"{run}: complete rounds are not 0..n-1 ({[i for i, _ in done]}); cannot resume")
    masks = {n: torch.ones_like(params[n], dtype=torch.bool) for n in names}
    rewind = None
    if done:  # resume: rewind weights, and the mask that follows the last complete round
        rewind = load_file(str(run / REWIND_FILE))
        last = done[-1][1]
        weights = {k: torch.from_numpy(v) for k, v in load_file(str(last / layout.WEIGHTS)).items()}
        stored = {k: torch.from_numpy(v).bool() for k, v in load_file(str(last / layout.MASKS)).items()}
        masks = pruning.next_masks(weights, stored, cfg.prune_fraction, cfg.schedule, original)

    trainer = Trainer(model, masks, data, tcfg, device)
    reports = []
    for n in range(len(done), cfg.rounds):
        began = time.perf_counter()
        round_seed = seed * 100_003 + n
        bar = progress(f"seed {seed} round {n}", total - (0 if n == 0 else start)) if progress else None
        if n == 0:
            if start > 0:  # train to the rewind point, keep it, then go on
                cost0 = trainer.train(0, start, round_seed, bar)
            rewind = _numpy_state(model)
            _save_rewind(run, rewind, start)
            cost = trainer.train(start, total, round_seed + 1, bar)
            if start > 0:
                cost = {k: cost[k] + cost0[k] if k != "train_loss" else cost[k] for k in cost}
        else:
            _load_state(model, rewind, device)
            trainer.set_masks({k: v.to(device) for k, v in masks.items()})
            cost = trainer.train(start, total, round_seed + 1, bar)
        metrics = {**trainer.evaluate(), **cost}
        kept = sum(int(m.sum()) for m in masks.values())
        density = kept / original
        weights_np = _numpy_state(model)
        layout.write_round(run, n, weights_np, {k: v.cpu().numpy().astype(np.uint8) for k, v in masks.items()},
                           {"density": density, "metrics": metrics,
                            "wall_seconds": time.perf_counter() - began})
        report = RoundReport(seed, n, density, metrics)
        reports.append(report)
        if on_round:
            on_round(report)
        weights = {k: torch.from_numpy(v) for k, v in weights_np.items()}
        masks = pruning.next_masks(weights, {k: v.cpu() for k, v in masks.items()}, cfg.prune_fraction,
                                   cfg.schedule, original)
    return reports


def _save_rewind(run: Path, state: dict[str, np.ndarray], step: int) -> None:
    with atomic_path(run / REWIND_FILE) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp),
                  metadata={"step": json.dumps(step)})
