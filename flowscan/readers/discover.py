"""Find the IMP runs below a path: the first reader that claims a folder owns it (and its subtree).

Whatever goes wrong while looking at one folder (a malformed manifest, an unreadable index, a
name that is not UTF-8) becomes that run's error; the walk goes on to the other folders.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from flowscan.errors import FlowscanError, ScanError, printable
from flowscan.io.location import location
from flowscan.readers import registry
from flowscan.readers.base import Reader, Run


def discover(root: Path, format: str | None = None, exclude: Path | None = None,
             found: Callable[[list[Run]], None] | None = None) -> list[Run]:
    """Runs below `root` in path order; a run whose layout is broken carries its error. `found` is
    called with the runs so far each time one is found."""
    root = location(root)
    if not root.is_dir():
        raise FlowscanError(f"{printable(str(root))}: not a folder (flowscan analyzes folders of checkpoints)")
    readers = [registry.get(format)] if format else registry.all_readers()
    exclude = exclude.resolve() if exclude else None
    local = isinstance(root, Path)
    inside = root.resolve() if local else None
    runs: list[Run] = []
    seen: set = set()
    stack = [root]
    while stack:  # depth first, in name order, without recursion (any depth of folders)
        folder = stack.pop()
        real = folder.resolve()
        if (exclude is not None and real == exclude) or (local and real in seen):
            continue   # the output folder, or a folder reached again through a link (no loops)
        seen.add(real)
        run, children = _look_at(folder, readers)
        if run is not None:
            run.name = _relative(root, folder)
            if local and not run.error:
                run.error = outside_link(run, inside)
            runs.append(run)
            if found is not None:
                found(runs)
        stack.extend(reversed(children))
    return runs


def outside_link(run: Run, inside: Path) -> str | None:
    """The refusal of a run that reaches, through a symbolic link, a file outside the scanned folder
    `inside` (None when every file it would read lies below it): flowscan reads nothing else."""
    real_folders: dict[str, str] = {}
    top = os.path.join(str(inside), "")   # with its separator: /a/b is not inside /a/bc

    def leaves(path: Path) -> bool:
        # in strings, and each folder resolved once: a name that is no link lies where its folder
        # really is (resolving a path costs a system call for each of its components)
        text = os.fspath(path)
        folder, name = os.path.split(text)
        if name in ("", ".", "..") or os.path.islink(text):
            target = os.path.realpath(text)
        else:
            if folder not in real_folders:
                real_folders[folder] = os.path.realpath(folder)
            target = os.path.join(real_folders[folder], name)
        return target != str(inside) and not target.startswith(top)

    candidates = [run.path] + [f for r in run.rounds for f in r.files]
    for rnd in run.rounds:   # folders a reader hands to a library whole (Orbax items): everything in them
        for item in (v for v in rnd.spec if isinstance(v, Path) and v.is_dir()):
            candidates += [Path(top) / name for top, dirs, files in os.walk(item) for name in dirs + files]
    for path in candidates:
        if leaves(path):
            return printable(f"{path}: a symbolic link to {path.resolve()}, outside {inside} (refused: flowscan "
                             "reads only the files below the folder it was given)")
    return None


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
