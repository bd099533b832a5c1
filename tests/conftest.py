from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from flowscan.cli import main
from flowscan.tables import TABLES

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def run_cli(*args: str, expect: int | None = 0):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if expect is not None:
        assert result.exit_code == expect, result.output
    return result


def read_tables(out: Path) -> dict[str, pl.DataFrame]:
    return {t: pl.read_parquet(out / f"{t}.parquet") for t in TABLES}


def analyze(path: Path, out: Path, *args: str, expect: int | None = 0) -> dict[str, pl.DataFrame]:
    run_cli("analyze", path, "-o", out, "-q", *args, expect=expect)
    return read_tables(out)


@pytest.fixture
def copy_fixture(tmp_path):
    """Copy a fixture folder into tmp_path (to break or extend it without touching the repo)."""
    def copy(name: str, dest: str | None = None) -> Path:
        target = tmp_path / (dest or name)
        shutil.copytree(FIXTURES / name, target)
        return target
    return copy
