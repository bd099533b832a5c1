"""Which runs are replicates of one experiment (seeds, open_lth replicates, ...)."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import polars as pl

from flowscan.errors import FlowscanError

# A run folder named like a replicate (replicate_1, seed0, seed-3, rep2, run_4, s1) belongs to
# the experiment of its parent folder.
REPLICATE = re.compile(r"^(?:replicate|seed|rep|run|trial|s)[_\-]?\d+$", re.IGNORECASE)
MEMBERSHIP_SCHEMA = {"run": pl.String, "experiment": pl.String, "task": pl.String, "architecture": pl.String}


@dataclass(frozen=True)
class Grouping:
    """How runs map to experiments: a mapping file, else a regex on the run path, else the layout."""

    regex: str | None = None
    mapping: dict[str, dict[str, str]] | None = None   # run -> {experiment, task, architecture}
    root: str | None = None     # name of the analysed archive folder, for runs directly in it

    def for_folder(self, out: Path) -> "Grouping":
        """This grouping, naming experiments of runs at the top of the archive after its folder."""
        from flowscan.tables import read_manifest

        manifest = read_manifest(out)
        if self.root is not None or manifest is None:
            return self
        return replace(self, root=Path(manifest["source"]).name)

    @classmethod
    def from_file(cls, path: Path, regex: str | None = None) -> "Grouping":
        return cls(regex, read_mapping(path))

    def experiment_of(self, run: str) -> str:
        if self.mapping and run in self.mapping and self.mapping[run].get("experiment"):
            return self.mapping[run]["experiment"]
        if self.regex:
            m = re.search(self.regex, run)
            if m:
                return m.group(1) if m.re.groups and m.group(1) is not None else m.group(0)
            return run
        parts = run.split("/")
        if len(parts) > 1 and REPLICATE.match(parts[-1]):
            return "/".join(parts[:-1])
        if (len(parts) == 1 and REPLICATE.match(parts[0])) or run == ".":
            return self.root or "."   # seeds directly in the archive: the archive is the experiment
        return run

    def membership(self, runs: Sequence[str]) -> pl.DataFrame:
        rows = {k: [] for k in MEMBERSHIP_SCHEMA}
        for run in runs:
            extra = (self.mapping or {}).get(run, {})
            rows["run"].append(run)
            rows["experiment"].append(self.experiment_of(run))
            rows["task"].append(extra.get("task") or None)
            rows["architecture"].append(extra.get("architecture") or None)
        return pl.DataFrame(rows, schema=MEMBERSHIP_SCHEMA)


def read_mapping(path: Path) -> dict[str, dict[str, str]]:
    """run -> {experiment, task, architecture} from a CSV (header row) or TOML file.

    TOML: one table per run, e.g. `["seed0"]` with `experiment = "r20-c10"`, `task = "cifar10"`.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(path.read_text())
            return {str(run): {k: str(v) for k, v in fields.items()} for run, fields in data.items()}
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "run" not in reader.fieldnames:
                raise FlowscanError(f"{path}: a mapping CSV needs a header with a 'run' column")
            return {row["run"]: {k: v for k, v in row.items() if k != "run" and v} for row in reader}
    except (OSError, ValueError) as exc:
        raise FlowscanError(f"{path}: unreadable run mapping: {exc}") from None
