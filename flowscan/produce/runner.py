"""Run IMP for several seeds: one folder per seed (seed_0, seed_1, ...), several at once on a GPU."""

from __future__ import annotations

import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import torch

from flowscan.produce.imp import IMPConfig, RoundReport, run_seed, run_seeds_packed
from flowscan.train.data import load
from flowscan.train.trainer import resolve_device


def seed_folder(out: Path, seed: int) -> Path:
    return Path(out) / f"seed_{seed}"


def round_line(r: RoundReport) -> str:
    """One line per round; with the adaptive schedule, its decision too."""
    m = r.metrics
    line = (f"seed {r.seed} round {r.round:>2}: density {r.density:.4f}  test acc {m['test_accuracy']:.4f}  "
            f"loss {m['test_loss']:.4f}  {int(m['train_steps'])} steps  {m['train_seconds']:.1f} s")
    if "attempts" in m:  # adaptive: which fraction was kept, after how many tries, and why
        tries = int(m["attempts"])
        line += (f"\n    adaptive: pruned {m['pruned_fraction']:.3f} after {tries} attempt(s)"
                 f"{f' ({tries - 1} discarded as not matching)' if tries > 1 else ''}; barrier "
                 f"{m['lmc_barrier']:+.4f}; {'matching' if m['matching'] else 'not matching at the smallest fraction'}"
                 + (f"; next fraction {m['prune_fraction_next']:.3f}" if "prune_fraction_next" in m else ""))
    return line


def stop_reason(cfg: IMPConfig, reports: Sequence[RoundReport]) -> list[str]:
    """Why each seed that trained rounds in this call stopped where it did."""
    last: dict[int, RoundReport] = {}
    for r in reports:
        last[r.seed] = r
    lines = []
    for seed, r in sorted(last.items()):
        if cfg.target_density is not None and r.density <= cfg.target_density:
            why = f"density {r.density:.4f} reached --target-density {cfg.target_density}"
        else:
            why = f"all {cfg.rounds} rounds done"
        lines.append(f"seed {seed}: stopped after round {r.round}: {why}")
    return lines


def _one_seed(cfg: IMPConfig, seed: int, out: Path, device: str, compile: bool) -> list[RoundReport]:
    # a worker process: its own data copy on its own stream of the GPU
    data = load(cfg.data).to(resolve_device(device))
    return run_seed(cfg, seed, seed_folder(out, seed), data, resolve_device(device), compile,
                    on_round=lambda r: print("\n".join([round_line(r), *(f"seed {r.seed}: {n}" for n in r.notes)]),
                                             file=sys.stderr, flush=True))   # progress: stderr, as everywhere


def check_model_and_data(cfg: IMPConfig, data) -> None:
    """Build the model for the data and run one example through it, before anything is written:
    an unknown model or one that cannot take this data is an error here, not mid-run."""
    from flowscan.errors import FlowscanError
    from flowscan.train import models

    try:
        model, spec = models.build(cfg.model, data.input_shape, data.n_classes)
    except ValueError as exc:
        raise FlowscanError(f"--model: {exc}") from None
    if spec.kind != data.kind:
        raise FlowscanError(f"model {cfg.model} takes {spec.kind} but dataset {data.name} has {data.kind}")
    model.eval()
    try:
        with torch.no_grad():
            model(data.x_test[:1].cpu())
    except Exception as exc:  # noqa: BLE001 - shape errors come as RuntimeError/ValueError/...
        raise FlowscanError(f"--model {cfg.model} cannot take --data {cfg.data} (inputs of shape "
                            f"{tuple(data.input_shape)}): {exc}") from None


def produce(cfg: IMPConfig, seeds: Sequence[int], out: Path, device: str = "auto", parallel: int = 1,
            compile: bool = True, on_round: Callable[[RoundReport], None] | None = None,
            progress=None, pack: bool | None = None, note: Callable[[str], None] | None = None) -> list[RoundReport]:
    """Every seed's run under `out`. `pack`: train the seeds of each round together in one model
    (default: on a GPU with several seeds); else `parallel` processes, or one seed after another."""
    out = Path(out)
    data = load(cfg.data)
    check_model_and_data(cfg, data)
    out.mkdir(parents=True, exist_ok=True)
    torch_device = resolve_device(device)
    if pack is None:
        pack = torch_device.type == "cuda" and len(seeds) > 1
    if pack and len(seeds) > 1:
        return run_seeds_packed(cfg, list(seeds), [seed_folder(out, s) for s in seeds], data.to(torch_device),
                                torch_device, compile, on_round, progress, note)
    if parallel <= 1 or len(seeds) <= 1:
        data = data.to(torch_device)
        reports = []
        for seed in seeds:
            reports += run_seed(cfg, seed, seed_folder(out, seed), data, torch_device, compile,
                                on_round, progress)
        return reports
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    with ProcessPoolExecutor(max_workers=min(parallel, len(seeds)), mp_context=ctx) as pool:
        futures = [pool.submit(_one_seed, cfg, seed, out, device, compile) for seed in seeds]
        return [r for f in futures for r in f.result()]
