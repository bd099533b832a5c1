"""Data and dependencies flow one way: no package imports one above it (imports inside functions
count too). The torch layer (`train`) serves both the producer and the landscape analyses; the
scanner never reaches torch code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "flowscan"
# who may not import whom: the torch layer is below the producer, which is below the landscape
# analyses; the scanner (io, readers) is below all of them and never imports them
FORBIDDEN = {
    "io": ("readers", "train", "produce", "landscape", "cli", "stats", "plot"),
    "readers": ("train", "produce", "landscape", "cli", "stats", "plot"),
    "train": ("produce", "landscape", "cli", "stats", "plot"),
    "produce": ("landscape", "cli"),
    "landscape": ("cli",),
    "stats": ("train", "produce", "landscape", "cli"),
}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_one_above_it(package):
    offences = []
    for path in sorted((PACKAGE / package).rglob("*.py")):
        for module in _imports(path):
            parts = module.split(".")
            if parts[0] == "flowscan" and len(parts) > 1 and parts[1] in FORBIDDEN[package]:
                offences.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not offences, "\n".join(offences)


def test_the_scanner_does_not_import_torch():
    for package in ("io", "readers"):
        for path in (PACKAGE / package).rglob("*.py"):
            assert "torch" not in {m.split(".")[0] for m in _imports(path)}, path
