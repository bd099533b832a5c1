"""Which runs and rounds a landscape analysis covers: `--runs PATTERN` and `--rounds SPEC`.

A study narrows the landscape analyses to what it needs without copying a sub-archive: `--runs`
is a shell pattern on run names as `analyze` names them (`seed_*`, `*/replicate_1`), `--rounds`
a list of round numbers and ranges (`0-4,8,12-`: 0 to 4, 8, and 12 onwards).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from flowscan.errors import FlowscanError

_PART = re.compile(r"^\s*(\d+)?\s*(-)?\s*(\d+)?\s*$")


@dataclass(frozen=True)
class RoundSpec:
    """Ranges of round numbers (inclusive; an open end reaches any round)."""

    ranges: tuple[tuple[int, int | None], ...] = ((0, None),)
    text: str = "all"

    @classmethod
    def parse(cls, text: str | None) -> "RoundSpec":
        if text is None or not text.strip():
            return cls()
        ranges = []
        for part in text.split(","):
            m = _PART.match(part)
            if not m or (m.group(1) is None and m.group(3) is None) or (m.group(2) is None and m.group(3)):
                raise FlowscanError(f"--rounds {text!r}: {part.strip()!r} is not a round or a range "
                                    "(write e.g. 0-4,8,12-)")
            low = int(m.group(1)) if m.group(1) is not None else 0
            high = low if m.group(2) is None else (int(m.group(3)) if m.group(3) is not None else None)
            if high is not None and high < low:
                raise FlowscanError(f"--rounds {text!r}: the range {part.strip()!r} runs backwards")
            ranges.append((low, high))
        return cls(tuple(ranges), text.strip())

    def __contains__(self, index: int) -> bool:
        return any(low <= index and (high is None or index <= high) for low, high in self.ranges)


def select_runs(runs: list, pattern: str | None, where) -> list:
    """The runs whose name matches `pattern` (all without one); none matching is an error that
    lists the names there are."""
    if not pattern:
        return runs
    chosen = [r for r in runs if fnmatch.fnmatchcase(r.name, pattern)]
    if not chosen:
        names = ", ".join(r.name for r in runs[:10]) + (", ..." if len(runs) > 10 else "")
        raise FlowscanError(f"{where}: no run matches --runs {pattern!r} (runs: {names})")
    return chosen
