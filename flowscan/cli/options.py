"""Options shared by the scanning commands, turned into a `pipeline.Options`."""

from __future__ import annotations

import functools
import shlex
import sys

import click


def command_line() -> str:
    """The command as typed, for table metadata and reports (from Python: the parsed parameters)."""
    ctx = click.get_current_context()
    if sys.argv[1:2] == [ctx.info_name]:  # `flowscan CMD ...` or `python -m flowscan CMD ...`
        return shlex.join(["flowscan", *sys.argv[1:]])
    words = ["flowscan", *ctx.command_path.split()[1:]]
    for name, value in ctx.params.items():
        for v in value if isinstance(value, tuple) else (value,):
            if v not in (None, False):
                words += [f"--{name.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return shlex.join(words)


class ArchiveParam(click.ParamType):
    """A local folder (must exist) or a store URL (s3://, gs://, hf://, https://...), as a
    `Path` or a `RemotePath`; a remote folder is looked at when the command reads it."""

    name = "PATH|URL"
    _local = click.Path(exists=True, file_okay=False)

    def convert(self, value, param, ctx):
        from flowscan.errors import FlowscanError
        from flowscan.io.location import is_url, location

        if isinstance(value, str) and value.lower().startswith("file://"):
            value = value[7:]
        if not isinstance(value, str) or not is_url(value):
            value = self._local.convert(value, param, ctx)
        try:
            return location(value)
        except FlowscanError as exc:
            self.fail(str(exc), param, ctx)


ARCHIVE = ArchiveParam()

BLOCKS_HELP = ("Block rule, repeatable, tried in order: a preset (see `flowscan formats`), "
               "LABEL=REGEX, or REGEX (label = first capture group). Default: detect a preset.")


def scan_options(command):
    @click.option("--blocks", "blocks", multiple=True, metavar="RULE", help=BLOCKS_HELP)
    @click.option("--format", "format_", metavar="NAME", help="Force a reader instead of auto-detecting.")
    @click.option("--select", metavar="PREFIX", help="Only tensors under PREFIX (e.g. encoder_q), prefix removed.")
    @click.option("--strip-model-prefix", is_flag=True, help="Drop a leading 'model.' from tensor names.")
    @click.option("--infer-masks", is_flag=True,
                  help="Infer masks from exact zeros of 2+-D tensors that have no stored mask.")
    @click.option("--read-timeout", type=click.FloatRange(min=0.1), default=600.0, show_default=True,
                  metavar="SECONDS", help="Most seconds a round read through h5py, tensorstore or msgpack may "
                                          "take; past it the round is a named error and the others go on.")
    @functools.wraps(command)
    def wrapper(*args, blocks, format_, select, strip_model_prefix, infer_masks, read_timeout, **kwargs):
        from flowscan.blocks import BlockRules
        from flowscan.errors import FlowscanError
        from flowscan.readers import registry
        from flowscan.readers.base import NameOptions

        try:
            if format_:
                registry.get(format_)
            rules = BlockRules.parse(blocks)
        except FlowscanError as exc:
            raise click.BadParameter(str(exc)) from None
        scan = dict(blocks=rules, names=NameOptions(strip_model_prefix, select),
                    format=format_, infer_masks=infer_masks, read_timeout=read_timeout)
        return command(*args, scan=scan, **kwargs)
    return wrapper


def parallel_options(command):
    """-j/--jobs and --engine: how rounds are read at once (analyze, inspect)."""
    command = click.option(
        "--engine", type=click.Choice(["auto", "threads", "processes", "dask"]), default="auto", show_default=True,
        help="threads: in this process (fastest for large checkpoints); processes: a crash costs only its "
             "round (faster for many small files); auto: processes for many small files, else threads; "
             "dask: a dask.distributed cluster (--scheduler, else a local one; pip install 'flowscan[dask]')."
    )(command)
    return click.option("-j", "--jobs", type=click.IntRange(1), default=None,
                        help="Rounds read at once (default: the cores this process may use).")(command)


def requires(*modules: str):
    """Check a command's optional packages before anything else runs: a missing one is a named
    error with the `pip install` to run (flowscan/extras.py), never an import traceback. Commands
    that need torch also get their CPU threads chosen (flowscan/cpu.py), said in a note."""
    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            from flowscan import extras
            from flowscan.errors import FlowscanError

            ctx = click.get_current_context()
            for module in modules:
                try:
                    extras.require(module, f"flowscan {ctx.info_name}")
                except FlowscanError as exc:
                    raise click.ClickException(str(exc)) from None
            if "torch" in modules:   # threads for a machine that may be shared (flowscan/cpu.py)
                from flowscan import cpu

                ctx.meta.setdefault("flowscan.notes", []).append(cpu.configure_torch_threads())
            return command(*args, **kwargs)
        return wrapper
    return decorate


def writable_output(folder) -> None:
    """Check, before any reading, that the output folder takes files: a bad -o is an error up front,
    not a traceback after the whole archive was read. Folders made for the check are removed again
    (a command refused later leaves nothing behind; writing makes them when it writes)."""
    import os
    import tempfile
    from pathlib import Path

    folder = Path(folder)
    made = [p for p in [folder, *folder.parents] if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".flowscan-write-test-"):
            pass
    except OSError as exc:
        raise click.ClickException(f"{folder}: cannot write the output here: {exc.strerror or exc}") from None
    finally:
        for path in made:   # deepest first
            try:
                os.rmdir(path)
            except OSError:
                break
