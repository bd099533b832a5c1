"""`flowscan transfer`: train a source archive's tickets on a target task, against baselines."""

from __future__ import annotations

from pathlib import Path

import click

from flowscan.cli.app import TrainingBars, app_options, device_option
from flowscan.cli.options import BLOCKS_HELP, command_line, requires


def _ints(text: str | None, what: str) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected integers like 3,6,9, got {text!r}", param_hint=what) from None
    if any(v < 0 for v in values):
        raise click.BadParameter("must be >= 0", param_hint=what)
    return values


@click.command()
@requires("torch")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("target")
@click.option("-o", "--output", "out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("flowscan-out"), show_default=True,
              help="Folder for the tables and figures; every pair transferred into it joins the tables.")
@click.option("--rounds", "rounds_text", metavar="R1,R2,...",
              help="Source rounds whose tickets are transferred (default: up to 3 spread to the last).")
@click.option("--seeds", type=click.IntRange(1), help="Seeds 0..N-1 (default: the target archive's seeds, or 1).")
@click.option("--arms", metavar="ARM,...",
              help="Arms to train (default: transferred, transferred_source_init, own, random_global, "
                   "random_layer); also: shuffled (the ticket permuted within each output unit).")
@click.option("--model", help="Target made here: its model (default: the source's, from its manifest).")
@click.option("--epochs", type=click.FloatRange(0, min_open=True), help="Target made here: epochs per round.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), help="Target made here: learning rate.")
@click.option("--batch-size", type=click.IntRange(1), help="Target made here: batch size.")
@click.option("--rewind", type=click.FloatRange(0), help="Target made here: rewind point (as produce).")
@click.option("--fill-unmatched", is_flag=True,
              help="Source tensors of another shape (e.g. a 10- vs 100-class head): a random mask at the "
                   "source tensor's density, and the target's own weights, instead of an error.")
@click.option("--format", "format_", metavar="NAME", help="Reader of SOURCE instead of auto-detecting.")
@click.option("--blocks", multiple=True, metavar="RULE", help=BLOCKS_HELP + " (for the sigma distance)")
@device_option
@click.option("--compile/--no-compile", default=True, show_default=True, help="CUDA graphs on a GPU.")
@app_options(json_output=True)
def transfer(source, target, out, rounds_text, seeds, arms, model, epochs, lr, batch_size, rewind, fill_unmatched,
             format_, blocks, device, compile, app) -> None:
    """Train SOURCE's tickets on TARGET (an archive `produce` wrote, or a dataset NAME[:ARG]) beside
    the target's own tickets and random masks of the same densities -> transfer*.parquet."""
    from flowscan import tables
    from flowscan.errors import FlowscanError
    from flowscan.plot import save
    from flowscan.plot.standard import transfer_figures
    from flowscan.train.trainer import resolve_device
    from flowscan.produce.transfer import CELLS, Plan, Recipe, pair_label, run_transfer
    from flowscan.stats.transfer import DEFAULT_ARMS, transfer_tables

    plan = Plan(source, target, _ints(rounds_text, "--rounds"), tuple(range(seeds)) if seeds else None,
                tuple(a.strip() for a in arms.split(",") if a.strip()) if arms else DEFAULT_ARMS,
                Recipe(model, epochs, lr, batch_size, rewind), fill_unmatched, format_, tuple(blocks))
    bars = TrainingBars(app)
    try:
        with bars.stack:
            run_transfer(plan, out, resolve_device(device), bars.note, bars, compile)
        frames = transfer_tables(out / CELLS)
    except FlowscanError as exc:
        raise click.ClickException(str(exc)) from None
    pair = pair_label(plan)
    app.wrote(tables.write_tables(frames, out, tables.metadata(command_line(), " ".join(blocks))))
    for name, (fig, _) in transfer_figures(frames).items.items():
        app.wrote(save(fig, out / "figures" / name))
    statement = frames["transfer_correlation"]["statement"][0]
    mine = frames["transfer_summary"].filter((frames["transfer_summary"]["source"] == pair[0])
                                             & (frames["transfer_summary"]["target"] == pair[1]))
    for row in mine.iter_rows(named=True):
        app.result(f"{pair[0]} -> {pair[1]} round {row['source_round']:>2} {row['arm']:<24} density "
                   f"{row['density']:.4f}  acc {row['accuracy_mean']:.4f} ± {row['accuracy_sem']:.4f}  "
                   f"gap vs random_layer {row['gap_mean']:+.4f} ± {row['gap_sem']:.4f}  (n={row['n_seeds']})")
    overlap = frames["transfer_overlap"]
    overlap = overlap.filter((overlap["source"] == pair[0]) & (overlap["target"] == pair[1]))
    for (rnd,), part in overlap.group_by("source_round", maintain_order=True):
        app.result(f"{pair[0]} -> {pair[1]} round {rnd:>2} ticket vs the target's own: overlap "
                   f"{part['overlap'].mean():.3f} (chance {part['chance'].mean():.3f}, Jaccard "
                   f"{part['jaccard'].mean():.3f}) over {part.height} seed(s)")
    app.result(statement)
    app.data({"summary": mine, "pairs": frames["transfer_pairs"], "correlation": frames["transfer_correlation"]})
