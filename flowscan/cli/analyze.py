"""`flowscan analyze PATH -o OUT`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from flowscan.cli.app import app_options
from flowscan.cli.options import ARCHIVE, command_line, parallel_options, scan_options, writable_output


@click.command()
@click.argument("path", type=ARCHIVE)
@click.option("-o", "--output", "out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("flowscan-out"), show_default=True, help="Folder for the parquet tables.")
@scan_options
@parallel_options
@click.option("--scheduler", metavar="ADDRESS",
              help="A dask scheduler, e.g. tcp://10.0.0.5:8786 (implies --engine dask; the workers must see "
                   "PATH at the same absolute path).")
@click.option("--strict", is_flag=True, help="Stop at the first run that fails.")
@click.option("--no-cache", is_flag=True, help="Do not reuse per-round sums from an earlier, interrupted run.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check the CRC-32 of every torch zip and .npz member read, so a flipped byte fails its run "
                   "(costs about 10 % of the warm throughput of torch zip archives).")
@click.option("--watch", is_flag=True,
              help="Keep watching PATH: re-scan every --interval seconds, read only new complete rounds, "
                   "rewrite the tables and print what changed; Ctrl-C ends it (exit 130, tables intact).")
@click.option("--interval", type=click.FloatRange(min=0.1), default=60.0, show_default=True, metavar="SECONDS",
              help="Seconds between scans with --watch.")
@app_options(json_output=True)
def analyze(path: Path, out: Path, scan: dict, jobs: int | None, engine: str, scheduler: str | None, strict: bool,
            no_cache: bool, verify: bool, watch: bool, interval: float, app) -> None:
    """Compute M, P, lambda and sigma per block for every IMP run below PATH."""
    from flowscan import engines, pipeline

    if watch and no_cache:
        raise click.UsageError("--watch reads only new rounds through the cache: drop --no-cache")
    writable_output(out)
    options = pipeline.Options(**scan, jobs=jobs or engines.default_jobs(),
                               engine="dask" if scheduler else engine, scheduler=scheduler, strict=strict,
                               verify=verify, cache_dir=None if no_cache else out / ".cache")
    if watch:
        _watch(path, out, options, interval, app)
        return
    results = _scan(path, out, options, app)
    _show(results, app)
    if any(not r.ok for r in results):
        sys.exit(1)


def _scan(path: Path, out: Path, options, app):
    """Discover, reduce and assemble every run, then write the tables (atomically)."""
    from flowscan import pipeline, tables
    from flowscan.errors import FlowscanError

    try:
        runs = pipeline.find_runs(path, options, exclude=out)
        n_rounds = sum(len(r.rounds) for r in runs if not r.error)
        app.detail(f"{len(runs)} run(s), {n_rounds} round(s) below {path}")
        options, why = pipeline.resolve_engine(runs, options)
        if why:
            app.detail(f"engine: {why}")
        with app.progress(n_rounds, "reading rounds") as step:
            results = pipeline.analyze_runs(runs, options, progress=step)
    except FlowscanError as exc:
        raise click.ClickException(str(exc)) from None
    frames = tables.build_tables(results)
    identity = tables.analysis_identity(path, options.identity())
    old = tables.read_manifest(out)
    if old is not None and old["analysis_id"] != identity["analysis_id"]:
        app.warn(f"replacing the analysis in {out} (of {old.get('source', '?')}, "
                 f"{'other options' if old.get('source') == identity['source'] else 'another archive'}; "
                 f"id {old['analysis_id']})")
    aside, moved = tables.set_aside_stale(out, identity)
    if moved:
        app.warn(f"moved {', '.join(moved)} of an earlier analysis of another archive or with other "
                 f"options to {aside}/")
    written = tables.write_tables(frames, out, tables.metadata(command_line(), str(options.blocks),
                                                               analysis_id=identity["analysis_id"]))
    tables.write_manifest(out, identity)
    app.wrote(written)
    return results


def _show(results, app) -> None:
    from flowscan import summary

    app.result(summary.analysis_summary(results))
    app.data(summary.analysis_data(results))
    for res in results:
        for warning in res.warnings:
            app.warn(f"run {res.run.name}: {warning}")
        if not res.ok:
            app.error(f"run {res.run.name}: {res.error}")


class _Stopped(Exception):
    """A signal asked the watcher to stop."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop(signum, _frame):
    raise _Stopped(signum)


def _watch(path: Path, out: Path, options, interval: float, app) -> None:
    """Scan, then re-scan every `interval` seconds printing what changed, until SIGINT (Ctrl-C, exit 130)
    or SIGTERM (exit 143). Both are handled here, also where SIGINT came ignored (a job started in the
    background of a script): the tables left are those of the last complete scan, as written atomically."""
    import signal
    import time

    from flowscan import watch
    from flowscan.errors import FlowscanError
    from flowscan.report import write_report

    previous = None
    handlers = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                results = _scan(path, out, options, app)
            except click.ClickException as exc:   # e.g. no runs yet: the first round is still coming
                app.note(f"{exc.message}; looking again in {interval:g} s")
                results = None
            if results is not None:
                if previous is None:
                    _show(results, app)
                else:
                    for line in watch.changes(previous, results) or ["no change"]:
                        app.result(f"{time.strftime('%H:%M:%S')} {line}")
                    seen = {(p.run.name, w) for p in previous for w in p.warnings}
                    for res in results:
                        for warning in res.warnings:
                            if (res.run.name, warning) not in seen:
                                app.warn(f"run {res.run.name}: {warning}")
                if previous is not None and (out / "report.html").exists():
                    try:
                        written, _warnings = write_report(out, command_line())
                        app.wrote([written])
                    except FlowscanError as exc:
                        app.warn(f"report.html not refreshed: {exc}")
                previous = results
            time.sleep(interval)
    except (KeyboardInterrupt, _Stopped) as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        click.echo(f"\nstopped watching ({signal.Signals(signum).name}); the tables in {out} are those of the "
                   "last complete scan", err=True)
        sys.exit(128 + signum)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
