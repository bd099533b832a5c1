"""`flowscan produce`: make IMP checkpoint archives in flowscan's layout."""

from __future__ import annotations

from pathlib import Path

import click

from flowscan.cli.app import TrainingBars, app_options, device_option
from flowscan.cli.options import requires, writable_output


@click.command()
@requires("torch")
@click.option("--model", required=True, help="cifar-resnet14/20/32/44/56, resnet18, resnet50, lenet, mlp, bert-small.")
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the archive: one seed_N folder per seed (resumes what is there).")
@click.option("--data", "data_spec", required=True, metavar="NAME[:ARG]",
              help="digits, mnist5k[:csv.gz], fashion-mnist:DIR[:N], cifar10:DIR, cifar100:DIR, "
                   "synthetic-images[:CxHxW[:N[:K]]], synthetic-tokens[:L[:N]].")
@click.option("--rounds", type=click.IntRange(1), default=10, show_default=True,
              help="IMP rounds, round 0 (dense) included.")
@click.option("--prune-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="Fraction pruned per round (the first one, with --schedule adaptive).")
@click.option("--schedule", type=click.Choice(["global", "original", "layerwise", "adaptive"]), default="global",
              show_default=True, help="global: of the remaining weights; original: of the original count "
                                      "(BERT tickets); layerwise: per tensor; adaptive: the fraction follows "
                                      "linear mode connectivity and matching (see README).")
@click.option("--target-density", type=click.FloatRange(0, 1, min_open=True),
              help="Stop after the first round at or below this density.")
@click.option("--match-tolerance", type=click.FloatRange(0), default=0.01, show_default=True,
              help="adaptive: matching = test error within this of the dense network's.")
@click.option("--barrier-tolerance", type=click.FloatRange(0), default=0.01, show_default=True,
              help="adaptive: largest error barrier still counted as linearly connected.")
@click.option("--growth", type=click.FloatRange(1, min_open=True), default=1.5, show_default=True,
              help="adaptive: factor by which the fraction grows or shrinks.")
@click.option("--max-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.8,
              show_default=True, help="adaptive: largest fraction pruned in one round.")
@click.option("--rewind", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Rewind point: 0 = initialization, < 1 = fraction of training, >= 1 = step count.")
@click.option("--seeds", type=click.IntRange(1), default=1, show_default=True, help="Number of seeds.")
@click.option("--first-seed", type=click.IntRange(0), default=0, show_default=True,
              help="Seed of the first run (then first+1, ...).")
@click.option("--epochs", type=click.FloatRange(0, min_open=True), default=10.0, show_default=True,
              help="Training epochs per round.")
@click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True, help="Training batch size.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=0.1, show_default=True,
              help="Peak learning rate (cosine decay).")
@click.option("--momentum", type=click.FloatRange(0, 1), default=0.9, show_default=True, help="SGD momentum.")
@click.option("--weight-decay", type=click.FloatRange(0), default=5e-4, show_default=True, help="Weight decay.")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True,
              help="Optimizer.")
@click.option("--warmup-epochs", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Linear learning-rate warm-up, in epochs.")
@click.option("--augment/--no-augment", default=False, show_default=True,
              help="Random crops and flips on the device (CIFAR).")
@click.option("--exclude", metavar="REGEX", help="Leave matching tensors dense (e.g. '^(conv1|fc)\\.' as Chen et al.).")
@click.option("--mask-from", metavar="ARCHIVE[:ROUND]",
              help="Round 0 trains under this mask (any archive flowscan reads; default round: the last) "
                   "instead of the dense one; with --rounds 1 only that round, else IMP goes on from it.")
@click.option("--init-from", metavar="ARCHIVE[:ROUND]",
              help="Train from these weights at the rewind step instead of this run's own rewind point "
                   "(ARCHIVE alone: its rewind point, which `produce` archives keep).")
@click.option("--fill-unmatched", is_flag=True,
              help="With --mask-from/--init-from: tensors of another shape get a random mask at the source "
                   "tensor's density and keep their own weights, instead of an error.")
@device_option
@click.option("--parallel", type=click.IntRange(1), default=None,
              help="Seeds trained at once in separate processes, instead of packed (default without packing: "
                   "up to 4 on a GPU, 1 on a CPU).")
@click.option("--pack-seeds/--no-pack-seeds", "pack", default=None,
              help="Train the seeds of each round together in one packed model (default: on a GPU with "
                   "several seeds; the output says which was done).")
@click.option("--compile/--no-compile", default=True, show_default=True, help="CUDA graphs on a GPU.")
@app_options()
def produce(model, data_spec, rounds, prune_fraction, schedule, target_density, match_tolerance,
            barrier_tolerance, growth, max_fraction, rewind, seeds, first_seed, epochs, batch_size, lr, momentum,
            weight_decay, optimizer, warmup_epochs, augment, exclude, mask_from, init_from, fill_unmatched, device,
            parallel, pack, compile, out, app) -> None:
    """Train, prune, rewind and repeat for every seed, writing each round as it completes."""
    from flowscan.errors import FlowscanError
    from flowscan.produce.imp import IMPConfig
    from flowscan.produce.runner import produce as run, round_line
    from flowscan.train.trainer import resolve_device

    cfg = IMPConfig(model=model, data=data_spec, rounds=rounds, prune_fraction=prune_fraction, schedule=schedule,
                    rewind=rewind, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                    weight_decay=weight_decay, optimizer=optimizer, warmup_epochs=warmup_epochs,
                    augment=augment, exclude=exclude, target_density=target_density,
                    match_tolerance=match_tolerance, barrier_tolerance=barrier_tolerance, growth=growth,
                    max_fraction=max_fraction, mask_from=mask_from, init_from=init_from,
                    fill_unmatched=fill_unmatched)
    writable_output(out)
    on_gpu = resolve_device(device).type == "cuda"
    if pack is None and parallel is not None:   # asking for processes is asking not to pack
        pack = False
    parallel = parallel or (min(seeds, 4) if on_gpu else 1)
    bars = TrainingBars(app)
    clock = Progress(_rounds_to_make(out, range(first_seed, first_seed + seeds), rounds))

    def on_round(report):
        bars.close()  # finish the round's bar before its summary line
        for line in report.notes:
            app.note(f"seed {report.seed}: {line}")
        app.status(f"{round_line(report)}  ({clock.tick(report.metrics.get('train_images', 0))})")

    try:
        with bars.stack:
            reports = run(cfg, list(range(first_seed, first_seed + seeds)), out, device, parallel, compile,
                          on_round, bars, pack=pack, note=app.note)
    except FlowscanError as exc:
        raise click.ClickException(str(exc)) from None
    from flowscan.produce.runner import stop_reason

    for line in stop_reason(cfg, reports):
        app.note(line)
    if clock.done:
        app.status(clock.total())
    app.note(f"done: {out} (analyse with: flowscan analyze {out} -o OUT)")


def _rounds_to_make(out, seeds, rounds: int) -> int:
    """Rounds this call will train: those of each seed not complete on disk already (it resumes)."""
    from flowscan import layout
    from flowscan.produce.runner import seed_folder

    done = 0
    for seed in seeds:
        folder = seed_folder(out, seed)
        try:
            done += len([i for i, _f in layout.complete_rounds(folder) if i < rounds]) if folder.is_dir() else 0
        except Exception:  # noqa: BLE001 - an unreadable folder is refused by the run itself, with its name
            pass
    return max(len(seeds) * rounds - done, 0)


class Progress:
    """Where a produce call stands: rounds made of those it will make, the time since the command
    started, an ETA from the rate of the rounds after the first (the first carries the start-up:
    loading data, building, compiling), and the total at the end, the command's own wall time."""

    def __init__(self, planned: int):
        import time

        from flowscan.cli import STARTED

        self._now, self.planned, self.done, self.images = time.monotonic, planned, 0, 0.0
        self.start, self.first = STARTED, None

    def tick(self, images: float) -> str:
        self.done += 1
        self.images += float(images)
        now = self._now()
        elapsed = now - self.start
        position = f"{self.done}/{self.planned}" if self.planned else f"{self.done}"
        if self.first is None:
            self.first = now
            left = self.planned - self.done
            return f"{position}, elapsed {elapsed:.0f} s" + (", ETA after the next round" if left > 0 else "")
        per_round = (now - self.first) / (self.done - 1)
        left = max(self.planned - self.done, 0)
        return f"{position}, elapsed {elapsed:.0f} s" + (f", ETA {left * per_round:.0f} s" if left else "")

    def total(self) -> str:
        elapsed = self._now() - self.start
        rate = f", {self.images / elapsed:.0f} images/s" if self.images and elapsed > 0 else ""
        return f"made {self.done} round(s) in {elapsed:.1f} s{rate}"
