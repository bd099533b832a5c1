"""Find the IMP runs below a path: the first reader that claims a folder owns it (and its subtree).

Whatever goes wrong while looking at one folder (a malformed manifest, an unreadable index, a
name that is not UTF-8) becomes that run's error; the walk goes on to the other folders.
"""

from __future__ import annotations

from pathlib import Path

from flowscan.errors import FlowscanError, ScanError, printable
from flowscan.io.location import location
from flowscan.readers import registry
from flowscan.readers.base import Reader, Run


def discover(root: Path, format: str | None = None, exclude: Path | None = None) -> list[Run]:
    """Runs below `root` in path order; a run whose layout is broken carries its error."""
    root = location(root)
    if not root.is_dir():
        raise FlowscanError(f"{printable(str(root))}: not a folder (flowscan analyzes folders of checkpoints)")
    readers = [registry.get(format)] if format else registry.all_readers()
    exclude = exclude.resolve() if exclude else None
    runs: list[Run] = []
    stack = [root]
    while stack:  # depth first, in name order, without recursion (any depth of folders)
        folder = stack.pop()
        if exclude is not None and folder.resolve() == exclude:
            continue
        run, children = _look_at(folder, readers)
        if run is not None:
            run.name = _relative(root, folder)
            runs.append(run)
        stack.extend(reversed(children))
    return runs


def _look_at(folder: Path, readers: list[Reader]) -> tuple[Run | None, list[Path]]:
    """(the run this folder is, or None), and the subfolders to look at next."""
    reader = None
    try:
        reader = next((r for r in readers if r.guess_can_open(folder)), None)
        if reader is None:
            return None, sorted(c for c in folder.iterdir() if c.is_dir() and not c.name.startswith("."))
        run = reader.open_run(folder)
        if not run.rounds:
            run.error = f"{printable(str(folder))}: no complete rounds found"
        return run, []
    except ScanError as exc:
        error = str(exc)
    except OSError as exc:
        error = f"{printable(str(exc.filename or folder))}: cannot read: {exc.strerror or exc}"
    except RecursionError:
        error = f"{printable(str(folder))}: nested too deeply to read"
    except Exception as exc:  # noqa: BLE001 - a reader's surprise costs only this folder
        error = f"{printable(str(folder))}: {type(exc).__name__}: {exc}"
    return Run(folder, reader.name if reader else "?", [], error=error), []


def _relative(root: Path, folder: Path) -> str:
    """The run's name: its folder relative to PATH, or the folder's own name when PATH is the run."""
    rel = folder.relative_to(root).as_posix()   # a PurePosixPath for store folders too
    if rel == ".":
        return printable(root.name or root.resolve().name or ".")
    return printable(rel)
