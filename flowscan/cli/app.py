"""What every command shares: how it talks to the user (`App`) and the options for that.

Results go to stdout (text, or JSON with `--json`); notes, warnings, progress and the list of
files written go to stderr, so `flowscan CMD --json > out.json` stays machine-readable. `-q`
silences notes and progress, `-v` adds detail. On a terminal progress is a bar; elsewhere (CI
logs, pipes) it is a few whole log lines.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable

import click

from flowscan.errors import terminal_safe


def _echo(text: str, err: bool = False) -> None:
    # names come from the files scanned: no control character of theirs reaches the terminal
    click.echo(terminal_safe(text), err=err)


class App:
    def __init__(self, quiet: bool = False, verbose: bool = False, as_json: bool = False):
        self.quiet, self.verbose, self.as_json = quiet, verbose and not quiet, as_json

    def result(self, text: str) -> None:
        """The command's answer (skipped with --json, which prints `data` instead)."""
        if not self.as_json:
            _echo(text)

    def data(self, obj: Any) -> None:
        if self.as_json:
            click.echo(json.dumps(_plain(obj), indent=2, allow_nan=False))

    def note(self, text: str) -> None:
        if not self.quiet:
            _echo(f"flowscan: {text}", err=True)

    def status(self, text: str) -> None:
        """A progress line, as it is: stderr, silenced by -q (and by --json)."""
        if not self.quiet:
            _echo(text, err=True)

    def detail(self, text: str) -> None:
        if self.verbose:
            _echo(f"flowscan: {text}", err=True)

    def warn(self, text: str) -> None:
        _echo(f"warning: {text}", err=True)

    def error(self, text: str) -> None:
        _echo(f"error: {text}", err=True)

    def wrote(self, paths: Iterable[Path | str]) -> None:
        """Every file a command wrote, one per line on stderr (not with -q: results and errors only)."""
        if self.quiet and not self.as_json:
            return
        for path in paths:
            _echo(f"wrote {path}", err=True)

    @contextlib.contextmanager
    def progress(self, length: int, label: str, lines: bool = True):
        """A callback taking a step count: a bar on a terminal, log lines at each tenth elsewhere
        (unless not `lines`: for quick steps whose log would be noise)."""
        if self.quiet or length <= 0 or (not lines and not sys.stderr.isatty()):
            yield lambda n=1: None
            return
        if sys.stderr.isatty():
            with click.progressbar(length=length, label=terminal_safe(label), file=sys.stderr) as bar:
                yield bar.update
            return
        done, marks = [0], {max(1, math.ceil(length * k / 10)) for k in range(1, 11)}

        def update(n: int = 1) -> None:
            for _ in range(n):
                done[0] += 1
                if done[0] in marks:
                    _echo(f"flowscan: {label}: {done[0]}/{length}", err=True)
        yield update


class TrainingBars:
    """A progress bar per round of training (produce, transfer): `bars(label, first_step,
    total_steps, steps_per_epoch)` opens one and returns its per-step callback; `close()` ends
    the open bar before a line is printed. Hidden with -q and off a terminal."""

    def __init__(self, app: App):
        self.app, self.stack = app, contextlib.ExitStack()

    def __call__(self, label: str, first: int, total: int, per_epoch: int):
        epochs = -(-total // per_epoch)
        bar = self.stack.enter_context(click.progressbar(
            length=total - first, label=label, file=sys.stderr, hidden=self.app.quiet or not sys.stderr.isatty(),
            item_show_func=lambda step: f"epoch {step // per_epoch + 1}/{epochs}" if step is not None else ""))
        position = [first]

        def update(n: int) -> None:
            position[0] += n
            bar.update(n, position[0] - 1)
        return update

    def close(self) -> None:
        self.stack.close()

    def note(self, text: str) -> None:
        self.close()
        self.app.note(text)


def _plain(obj: Any) -> Any:
    """JSON-safe: NaN and infinities become null, paths strings, frames lists of rows."""
    if hasattr(obj, "to_dicts"):
        obj = obj.to_dicts()
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _plain(obj.item())
    return obj


def app_options(json_output: bool = False):
    """-q/--quiet and -v/--verbose (and --json where asked) on a command, handed over as `app`."""
    def decorate(command):
        @click.option("-q", "--quiet", is_flag=True, help="Print only results and errors: no notes, no progress.")
        @click.option("-v", "--verbose", is_flag=True, help="Print more detail about what is done.")
        @functools.wraps(command)
        def wrapper(*args, quiet, verbose, **kwargs):
            as_json = kwargs.pop("as_json", False)
            app = App(quiet or as_json, verbose, as_json)
            for note in click.get_current_context().meta.pop("flowscan.notes", []):   # e.g. from `requires`
                app.note(note)
            return command(*args, app=app, **kwargs)
        if json_output:
            wrapper = click.option("--json", "as_json", is_flag=True,
                                   help="Print the result as JSON on stdout (notes stay on stderr).")(wrapper)
        return wrapper
    return decorate


DEVICE_HELP = "auto (a GPU when there is one), cpu, cuda or cuda:N."


def device_option(command):
    return click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)(command)
