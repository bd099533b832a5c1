"""Iterative magnitude pruning for one seed, round by round, resumable.

Round n: train the rewound weights under mask n, evaluate, write the round (atomically), then
prune to mask n+1. Everything a round needs is a function of (seed, round, rewind weights,
mask n, the fraction chosen after round n-1), so a run killed at any moment and started again
with the same arguments resumes after its last complete round and ends with the same archive.

The adaptive schedule follows Paul et al.: at higher sparsities successive rounds are linearly
connected exactly when the sparser one is matching, so the fraction can grow while that holds.
Round n is a candidate pruned by fraction f from round n-1 and trained. If it is not matching
(test error more than `match_tolerance` above the dense network's) it is discarded, its
training still counted in the round's cost, and round n is redone with f / `growth` (at
`min_fraction` a candidate is kept whatever it scores). A matching round is kept; the next
round then prunes f * `growth` (at most `max_fraction`) if the error barrier on the line from
round n-1 was at most `barrier_tolerance`, and f / `growth` if the barrier rose above it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from flowscan import layout
from flowscan.matching import is_matching
from flowscan.errors import FlowscanError
from flowscan.io.atomic import atomic_path
from flowscan.produce import pruning, sources
from flowscan.train import models
from flowscan.produce.sources import REWIND_FILE
from flowscan.train.data import Dataset
from flowscan.train.trainer import TrainConfig, Trainer



@dataclass(frozen=True)
class IMPConfig:
    model: str
    data: str
    rounds: int
    prune_fraction: float = 0.2
    schedule: str = "global"     # global, original, layerwise or adaptive
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
    target_density: float | None = None   # stop after the first round at or below it
    # start from another archive (ARCHIVE[:ROUND], see produce/sources.py): round 0 trains under
    # that mask instead of the dense one, and/or from those weights instead of the own rewind point
    mask_from: str | None = None
    init_from: str | None = None
    fill_unmatched: bool = False          # tensors that do not fit: random mask / own weights
    # adaptive schedule
    match_tolerance: float = 0.01
    barrier_tolerance: float = 0.01
    growth: float = 1.5
    max_fraction: float = 0.8
    min_fraction: float = 0.05

    def manifest_args(self, seed: int) -> dict:
        return {**asdict(self), "seed": seed}


@dataclass
class RoundReport:
    seed: int
    round: int
    density: float
    metrics: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)   # how the run started (--mask-from/--init-from)


def rewind_step(cfg: IMPConfig, total: int) -> int:
    if cfg.rewind < 0:
        raise FlowscanError("--rewind must be >= 0")
    return int(round(cfg.rewind * total)) if cfg.rewind < 1 else min(int(cfg.rewind), total)


def numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """A copy of the model's state: on the CPU, .numpy() would share memory with the live
    parameters, and training would then move the saved rewind point too."""
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().numpy().copy()
            for k, v in model.state_dict().items()}


# arguments that only say when a run stops, not how its rounds are made: a run may continue
# under new values (more rounds, a lower target density) with every round made so far unchanged
STOPPING_ARGS = ("rounds", "target_density")


def check_or_write_manifest(run: Path, args: dict) -> str | None:
    """Refuse to mix runs: an existing folder must have been made with the same arguments, but for
    the stopping arguments, which may change (the manifest then records the new ones). Returns a
    note for the user when the run continues under new stopping arguments."""
    path = run / layout.RUN_MANIFEST
    # a folder where no round completed holds nothing to protect: new arguments replace the old
    if path.is_file() and layout.complete_rounds(run):
        old = layout.run_args(run) or {}
        making = lambda a: {k: v for k, v in a.items() if k not in STOPPING_ARGS}  # noqa: E731
        diff = layout.args_difference(making(old), making(args))
        if diff:
            raise FlowscanError(f"{run} holds a run made with other arguments ({diff}); use another output "
                                "folder, or the same arguments to resume (only --rounds and --target-density "
                                "may change, to continue it)")
        stopping = layout.args_difference({k: old.get(k) for k in STOPPING_ARGS},
                                          {k: args.get(k) for k in STOPPING_ARGS})
        if not stopping:
            return None
        layout.write_run_manifest(run, args)   # atomic: a kill leaves the old or the new manifest
        return f"continuing with new stopping arguments ({stopping}); the rounds made so far are kept as they are"
    layout.write_run_manifest(run, args)
    return None


class Session:
    """One seed's model, prunable set, schedule and trainer."""

    def __init__(self, cfg: IMPConfig, seed: int, data: Dataset, device: torch.device, compile: bool = True):
        # the adaptive schedule decides on a validation split carved from the training data, so
        # that the test error it reports never steered it
        data, self.validation = validation_split(data) if cfg.schedule == "adaptive" else (data, None)
        self.cfg, self.seed, self.data, self.device = cfg, seed, data, device
        torch.manual_seed(seed)
        model, spec = models.build(cfg.model, data.input_shape, data.n_classes)
        if spec.kind != data.kind:
            raise FlowscanError(f"model {cfg.model} takes {spec.kind} but dataset {data.name} has {data.kind}")
        self.model = model.to(device)
        self.names = models.prunable_names(self.model, spec, cfg.exclude)
        if not self.names:
            raise FlowscanError(f"model {cfg.model}: no prunable tensors (check --exclude)")
        params = dict(self.model.named_parameters())
        self.original = sum(params[n].numel() for n in self.names)
        per_epoch = self.per_epoch = max(1, len(data.y_train) // min(cfg.batch_size, len(data.y_train)))
        self.total = max(1, int(round(cfg.epochs * per_epoch)))
        self.start = rewind_step(cfg, self.total)
        tcfg = TrainConfig(steps=self.total, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, optimizer=cfg.optimizer,
                           warmup=int(cfg.warmup_epochs * per_epoch), augment=cfg.augment, compile=compile)
        self.trainer = Trainer(self.model, self.dense_masks(), data, tcfg, device)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        params = dict(self.model.named_parameters())
        return {n: tuple(params[n].shape) for n in self.names}

    def dense_masks(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        return {n: torch.ones_like(params[n], dtype=torch.bool) for n in self.names}

    def load(self, state: dict[str, np.ndarray]) -> None:
        self.model.load_state_dict({k: torch.from_numpy(np.array(v)).to(self.device) for k, v in state.items()})

    def train_round(self, masks: dict[str, torch.Tensor], rewind: dict[str, np.ndarray] | None,
                    bar=None) -> tuple[dict, dict[str, np.ndarray] | None]:
        """Train under `masks` from the rewind point to the end of training. Without a `rewind`
        state (a run's first round), the rewind point is made first: the dense network is trained
        from initialization to the rewind step. Returns the metrics and the rewind state made."""
        def alone(start, stop, masks, seeds, bar):
            self.trainer.set_masks({k: v.to(self.device) for k, v in masks[0].items()})
            return [self.trainer.train(start, stop, seeds[0], bar)]
        return train_rounds([self], [masks], [rewind], alone, bar)[0]

    def round_metrics(self, cost: dict, cost0: dict | None) -> dict:
        """The metrics of a trained round: test (and validation) error, and the training cost
        (`cost0`: of making the rewind point, in a run's first round)."""
        if cost0:
            cost = {k: cost[k] + cost0[k] if k not in ("train_loss", "packed_seeds") else cost[k] for k in cost}
        # n_classes: the chance error bounds what `fit` may call the error at maximal pruning
        metrics = {**self.trainer.evaluate(), **cost, "n_classes": float(self.data.n_classes)}
        if self.validation is not None:
            from flowscan.train.lmc import evaluate

            metrics["validation_error"], metrics["validation_loss"] = evaluate(self.model, self.validation)
        return metrics

    def prune(self, weights: dict[str, np.ndarray], masks: dict[str, torch.Tensor],
              fraction: float) -> dict[str, torch.Tensor]:
        schedule = "global" if self.cfg.schedule == "adaptive" else self.cfg.schedule
        return pruning.next_masks({k: torch.from_numpy(weights[k]) for k in self.names},
                                  {k: v.cpu() for k, v in masks.items()}, fraction, schedule, self.original)

    def density(self, masks) -> float:
        return sum(int(m.sum()) for m in masks.values()) / self.original


# train(start, stop, masks per session, data-order seed per session, bar) -> cost per session
TrainSteps = Callable[[int, int, list, list, object], list]


def train_rounds(sessions: list[Session], masks: list[dict[str, torch.Tensor]],
                 rewinds: list[dict[str, np.ndarray] | None], train: TrainSteps,
                 bar=None) -> list[tuple[dict, dict[str, np.ndarray] | None]]:
    """One round of each session (same configuration, same round), trained by `train`: alone or
    packed. Returns each session's (metrics, rewind state made: its first round only)."""
    first = sessions[0]
    # one data order per seed for every round, as open_lth does per replicate: rounds then
    # differ by their masks only, not by SGD noise
    round_seeds = [s.seed * 100_003 for s in sessions]
    made, cost0 = [None] * len(sessions), [None] * len(sessions)
    if rewinds[0] is None:
        if first.start > 0:
            cost0 = train(0, first.start, [s.dense_masks() for s in sessions], round_seeds, bar)
        made = [numpy_state(s.model) for s in sessions]
    else:
        for session, rewind in zip(sessions, rewinds):
            session.load(rewind)
    costs = train(first.start, first.total, masks, [r + 1 for r in round_seeds], bar)
    return [(s.round_metrics(cost, c0), m) for s, cost, c0, m in zip(sessions, costs, cost0, made)]


VALIDATION_FRACTION = 0.1


def validation_split(data: Dataset) -> tuple[Dataset, Dataset]:
    """(training data less a validation split, the split as a dataset whose "test" part it is).
    The split is the same for every seed (a fixed permutation), so the seeds' dense validation
    errors are comparable."""
    n = len(data.y_train)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(12345)).to(data.x_train.device)
    k = max(1, int(round(VALIDATION_FRACTION * n)))
    val, train = order[:k], order[k:]
    kept = replace(data, x_train=data.x_train[train], y_train=data.y_train[train])
    held = replace(data, name=f"{data.name}:validation", x_train=data.x_train[train], y_train=data.y_train[train],
                   x_test=data.x_train[val], y_test=data.y_train[val])
    return kept, held


@dataclass
class Start:
    """Where a run's round 0 starts: its mask (None: dense) and the weights at the rewind step
    (None: the run's own, made by training from its initialization)."""

    masks: dict[str, torch.Tensor] | None = None
    rewind: dict[str, np.ndarray] | None = None
    notes: list[str] = field(default_factory=list)


def starting_point(cfg: IMPConfig, session: Session) -> Start:
    """The Start that --mask-from / --init-from name, fitted to this session's model."""
    start = Start()
    if cfg.mask_from:
        ref = sources.ArchiveRef.parse(cfg.mask_from)
        picked = sources.pick_run(sources.runs_of(ref.path), session.seed, "--mask-from")
        rnd = sources.find_round(picked.run, ref.round)
        fitted = sources.fit_masks(sources.read_round(rnd), session.shapes(),
                                   f"--mask-from {picked.run.path} round {rnd.index}", cfg.fill_unmatched,
                                   np.random.default_rng(session.seed))
        start.masks = {k: torch.from_numpy(v) for k, v in fitted.masks.items()}
        start.notes += picked.notes + fitted.notes + [
            f"round 0 trains under the mask of {picked.run.path} round {rnd.index} "
            f"(density {session.density(start.masks):.4f})"]
    if cfg.init_from:
        ref = sources.ArchiveRef.parse(cfg.init_from)
        picked = sources.pick_run(sources.runs_of(ref.path), session.seed, "--init-from")
        if ref.round is None:
            other, what = sources.rewind_state(picked.run), f"{picked.run.path} rewind point"
        else:
            rnd = sources.find_round(picked.run, ref.round)
            other = sources.read_round(rnd, copy_weights=True).weights
            what = f"{picked.run.path} round {rnd.index}"
        start.rewind, notes = sources.fit_state(numpy_state(session.model), other, f"--init-from {what}",
                                                cfg.fill_unmatched)
        start.notes += picked.notes + notes + [f"training starts at step {session.start} from the weights of {what}"]
    return start


def adapt_fraction(cfg: IMPConfig, fraction: float, matching: bool, barrier: float) -> float:
    """The adaptive schedule's next fraction: for the retry after a non-matching candidate, or for
    the next round after a matching one (see the module docstring)."""
    if matching and barrier <= cfg.barrier_tolerance:
        return min(fraction * cfg.growth, cfg.max_fraction)
    return max(fraction / cfg.growth, cfg.min_fraction)


def _barrier(session: Session, before: dict[str, np.ndarray], after: dict[str, np.ndarray],
             after_masks: dict[str, torch.Tensor]) -> float:
    from flowscan.train import lmc

    to_t = lambda s: {k: torch.from_numpy(np.array(v)).to(session.device) for k, v in s.items()}  # noqa: E731
    masks = {k: v.to(session.device) for k, v in after_masks.items()}
    curve = lmc.interpolate(session.model, to_t(before), to_t(after), masks, session.validation or session.data,
                            lmc.alpha_grid(5))
    return curve.barrier


def _decision_error(metrics: dict) -> float:
    """The error the adaptive schedule decides on: validation, never test (older runs: test)."""
    return metrics["validation_error"] if "validation_error" in metrics else 1 - metrics["test_accuracy"]


class SeedRun:
    """One seed's run folder through its rounds: what the next round trains under (`masks`,
    `rewind`), and, once it is trained, what is written and what the round after it prunes
    (`record`). The training itself is the caller's: one seed at a time (`run_seed`) or the
    seeds of a round together (`run_seeds_packed`)."""

    def __init__(self, cfg: IMPConfig, seed: int, run: Path, data: Dataset, device: torch.device,
                 compile: bool = True):
        run.mkdir(parents=True, exist_ok=True)
        self.cfg, self.seed, self.run = cfg, seed, run
        self.continued = check_or_write_manifest(run, cfg.manifest_args(seed))
        self.session = session = Session(cfg, seed, data, device, compile)
        done = layout.complete_rounds(run)
        if [i for i, _ in done] != list(range(len(done))):
            raise FlowscanError(f"{run}: complete rounds are not 0..n-1 ({[i for i, _ in done]}); cannot resume")
        self.start = starting_point(cfg, session) if (cfg.mask_from or cfg.init_from) and not done else Start()
        self.masks, self.rewind = (self.start.masks or session.dense_masks()), self.start.rewind
        self.previous, self.previous_masks = None, None
        self.fraction, self.dense_error = cfg.prune_fraction, None
        self.next_round, self.stopped, self.reports = len(done), False, []
        if self.rewind is not None:
            _save_rewind(run, self.rewind, session.start)
        if done:  # resume: rewind weights, and the mask that follows the last complete round
            self.rewind = load_file(str(run / REWIND_FILE))
            last = done[-1][1]
            info = layout.read_json(last / layout.ROUND_MANIFEST)
            if cfg.target_density is not None and info["density"] <= cfg.target_density:
                self.stopped = True
                return
            self.previous = load_file(str(last / layout.WEIGHTS))
            self.previous_masks = {k: torch.from_numpy(v).bool()
                                   for k, v in load_file(str(last / layout.MASKS)).items()}
            self.fraction = info.get("prune_fraction_next", cfg.prune_fraction)
            self.dense_error = _decision_error(layout.read_json(done[0][1] / layout.ROUND_MANIFEST)["metrics"])
            self.masks = session.prune(self.previous, self.previous_masks, self.fraction)

    @property
    def finished(self) -> bool:
        return self.stopped or self.next_round >= self.cfg.rounds

    def bar(self, progress, seeds: str | None = None):
        """The progress bar of the next round (`seeds`: the label of seeds trained together)."""
        first = 0 if self.next_round == 0 else self.session.start
        label = f"seeds {seeds}" if seeds else f"seed {self.seed}"
        return progress(f"{label} round {self.next_round}", first, self.session.total,
                        self.session.per_epoch) if progress else None

    def record(self, metrics: dict, made: dict[str, np.ndarray] | None, began: float, bar=None) -> RoundReport:
        """Round `next_round` has been trained into the session's model: gate it (adaptive), write it,
        and prune the mask of the round after it."""
        cfg, session, n = self.cfg, self.session, self.next_round
        if made is not None:
            self.rewind = made
            _save_rewind(self.run, made, session.start)
        if n > 0:
            metrics["pruned_fraction"] = self.fraction
        if cfg.schedule == "adaptive" and n > 0:
            self.masks, metrics, self.fraction = _adaptive_round(
                session, n, self.previous, self.previous_masks, self.masks, metrics, self.fraction,
                self.dense_error, self.rewind, bar)
        weights = numpy_state(session.model)
        self.dense_error = _decision_error(metrics) if self.dense_error is None else self.dense_error
        density = session.density(self.masks)
        info = {"density": density, "metrics": metrics, "prune_fraction_next": self.fraction,
                "wall_seconds": time.perf_counter() - began}
        if n == 0 and self.start.notes:
            info["start"] = self.start.notes
        layout.write_round(self.run, n, weights,
                           {k: v.cpu().numpy().astype(np.uint8) for k, v in self.masks.items()}, info)
        shown = {**metrics, "prune_fraction_next": self.fraction} if cfg.schedule == "adaptive" else metrics
        notes = ((self.start.notes if n == 0 else [])
                 + ([self.continued] if self.continued and not self.reports else []))
        report = RoundReport(self.seed, n, density, shown, notes)
        self.reports.append(report)
        self.next_round += 1
        if cfg.target_density is not None and density <= cfg.target_density:
            self.stopped = True
        else:
            self.previous, self.previous_masks = weights, self.masks
            self.masks = session.prune(weights, self.masks, self.fraction)
        return report


def run_seed(cfg: IMPConfig, seed: int, run: Path, data: Dataset, device: torch.device, compile: bool = True,
             on_round: Callable[[RoundReport], None] | None = None,
             progress: Callable[[str, int, int, int], Callable[[int], None]] | None = None) -> list[RoundReport]:
    """All rounds of one seed into `run` (resuming after its last complete round).

    `progress(label, first_step, total_steps, steps_per_epoch)` returns a per-step callback."""
    return _rounds_alone(SeedRun(cfg, seed, run, data, device, compile), on_round, progress)


def _rounds_alone(seed_run: SeedRun, on_round, progress) -> list[RoundReport]:
    while not seed_run.finished:
        began = time.perf_counter()
        bar = seed_run.bar(progress)
        metrics, made = seed_run.session.train_round(seed_run.masks, seed_run.rewind, bar)
        report = seed_run.record(metrics, made, began, bar)
        if on_round:
            on_round(report)
    return seed_run.reports


def run_seeds_packed(cfg: IMPConfig, seeds: list[int], runs: list[Path], data: Dataset, device: torch.device,
                     compile: bool = True, on_round: Callable[[RoundReport], None] | None = None,
                     progress=None, note: Callable[[str], None] | None = None) -> list[RoundReport]:
    """The seeds' runs with the seeds of each round trained together in one packed model
    (flowscan/train/packed.py); each run's folder, rounds and resume behaviour are those of
    `run_seed`. Seeds resumed at different rounds catch up round by round. Models that do not
    pack, and the adaptive schedule (its retries differ per seed), train one at a time;
    `note` is told which was done, before the first round."""
    from flowscan.train.packed import try_pack

    seed_runs = [SeedRun(cfg, seed, run, data, device, compile) for seed, run in zip(seeds, runs)]
    trainer, how = None, "seeds trained one at a time: the adaptive schedule's retries differ per seed"
    if cfg.schedule != "adaptive":
        trainer, how = try_pack([r.session.model for r in seed_runs], [r.masks for r in seed_runs],
                                seed_runs[0].session.data, seed_runs[0].session.trainer.cfg, device)
    if note:
        note(how)
    if trainer is None:
        return [report for r in seed_runs for report in _rounds_alone(r, on_round, progress)]
    trainers = {len(seed_runs): trainer}
    while True:
        live = [r for r in seed_runs if not r.finished]
        if not live:
            break
        n = min(r.next_round for r in live)
        group = [r for r in live if r.next_round == n]
        if len(group) not in trainers:   # seeds resumed at other rounds: a packing of this size
            trainers[len(group)], _ = try_pack([r.session.model for r in group], [r.masks for r in group],
                                               group[0].session.data, group[0].session.trainer.cfg, device)
        trainer = trainers[len(group)]
        trainer.models = [r.session.model for r in group]
        began = time.perf_counter()

        def together(start, stop, masks, data_seeds, bar):
            trainer.set_seed_masks(masks)
            return trainer.train_seeds(start, stop, data_seeds, bar)

        bar = group[0].bar(progress, seeds=", ".join(str(r.seed) for r in group))
        results = train_rounds([r.session for r in group], [r.masks for r in group], [r.rewind for r in group],
                               together, bar)
        for seed_run, (metrics, made) in zip(group, results):
            report = seed_run.record(metrics, made, began)
            if on_round:
                on_round(report)
    return [report for r in seed_runs for report in r.reports]


def _adaptive_round(session: Session, n: int, previous, previous_masks, masks, metrics, fraction: float,
                    dense_error: float, rewind, bar):
    """Gate candidate round n; retry with smaller fractions until one is accepted.
    Returns (masks, metrics with the summed cost, fraction for the next round)."""
    cfg = session.cfg
    cost = {k: 0.0 for k in ("train_steps", "train_seconds", "train_images", "lmc_seconds")}
    attempts = 0
    while True:
        attempts += 1
        for k in ("train_steps", "train_seconds", "train_images"):
            cost[k] += metrics[k]
        trained = numpy_state(session.model)
        lmc_began = time.perf_counter()
        barrier = _barrier(session, previous, trained, masks)
        cost["lmc_seconds"] += time.perf_counter() - lmc_began
        session.load(trained)  # the LMC evaluation moved the model
        matching = bool(is_matching(_decision_error(metrics), dense_error, cfg.match_tolerance))
        if matching or fraction <= cfg.min_fraction:
            metrics = {**metrics, **cost, "lmc_barrier": barrier, "matching": float(matching),
                       "attempts": float(attempts), "pruned_fraction": fraction}
            return masks, metrics, adapt_fraction(cfg, fraction, matching, barrier)
        fraction = adapt_fraction(cfg, fraction, False, barrier)
        masks = session.prune(previous, previous_masks, fraction)
        metrics, _ = session.train_round(masks, rewind, bar)


def _save_rewind(run: Path, state: dict[str, np.ndarray], step: int) -> None:
    with atomic_path(run / REWIND_FILE) as tmp:
        save_file({k: layout.contiguous(v) for k, v in state.items()}, str(tmp),
                  metadata={"step": json.dumps(step)})


def probe_round(run, fractions, tolerance: float, device: torch.device, dense_error: float, wanted=None,
                progress=None) -> list[tuple]:
    """Prune each fraction from every round of a produce run (those in `wanted`, where given),
    retrain from its rewind point, and say whether the result is matching against `dense_error`
    (used by `flowscan sharpness --probe`, which measures it as lmc does)."""
    from flowscan.train.data import load

    args = layout.read_json(run.path / layout.RUN_MANIFEST)["args"]
    seed = args.pop("seed")
    cfg = IMPConfig(**args)
    session = Session(cfg, seed, load(cfg.data).to(device), device, compile=False)
    rewind = load_file(str(run.path / REWIND_FILE))
    rounds = [(i, f) for i, f in layout.complete_rounds(run.path) if wanted is None or i in wanted]

    def stored():
        for index, folder in rounds:
            weights = load_file(str(folder / layout.WEIGHTS))
            masks = {k: torch.from_numpy(v).bool() for k, v in load_file(str(folder / layout.MASKS)).items()}
            yield index, weights, masks
    return probe_rounds(run.name, session, rewind, stored(), fractions, dense_error, tolerance, progress)


def probe_rounds(name: str, session: Session, rewind: dict[str, np.ndarray], rounds, fractions,
                 dense_error: float, tolerance: float, progress=None) -> list[tuple]:
    """(run, round, fraction, test error, matching, dense error) for each (round index, weights,
    masks) of `rounds` and each fraction: pruned from the round's weights, retrained by `session`
    from `rewind`; matching as flowscan/matching.py defines it."""
    rows = []
    for index, weights, masks in rounds:
        for k, f in enumerate(fractions, 1):
            if progress:
                progress(f"{name}: round {index}: retraining with {f:g} more pruned ({k}/{len(fractions)})")
            metrics, _ = session.train_round(session.prune(weights, masks, f), rewind)
            error = 1 - metrics["test_accuracy"]
            rows.append((name, index, f, error, is_matching(error, dense_error, tolerance), dense_error))
    return rows
