"""Find the IMP runs below a path: the first reader that claims a folder owns it (and its subtree)."""

from __future__ import annotations

import os
from pathlib import Path

from flowscan.errors import FlowscanError, ScanError
from flowscan.readers import registry
from flowscan.readers.base import Reader, Run


def discover(root: Path, format: str | None = None, exclude: Path | None = None) -> list[Run]:
    """Runs below `root` in path order; a run whose layout is broken carries its error."""
    root = Path(root)
    if not root.is_dir():
        raise FlowscanError(f"{root}: not a folder (flowscan analyzes folders of checkpoints)")
    readers = [registry.get(format)] if format else registry.all_readers()
    exclude = exclude.resolve() if exclude else None
    runs: list[Run] = []
    _walk(root, root, readers, exclude, runs)
    return runs


def _walk(root: Path, folder: Path, readers: list[Reader], exclude: Path | None, runs: list[Run]) -> None:
    if exclude is not None and folder.resolve() == exclude:
        return
    reader = None
    try:
        reader = next((r for r in readers if r.guess_can_open(folder)), None)
        if reader is not None:
            run = reader.open_run(folder)
            if not run.rounds:
                run.error = f"{folder}: no complete rounds found"
    except (ScanError, OSError) as exc:
        run = Run(folder, reader.name if reader else "?", [], error=str(exc))
    else:
        if reader is None:
            for child in sorted(folder.iterdir()):
                if child.is_dir() and not child.name.startswith("."):
                    _walk(root, child, readers, exclude, runs)
            return
    run.name = _relative(root, folder)
    runs.append(run)


def _relative(root: Path, folder: Path) -> str:
    rel = os.path.relpath(folder, root)
    return "." if rel == "." else Path(rel).as_posix()
