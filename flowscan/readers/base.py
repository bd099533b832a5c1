"""The reader plugin interface and the data model every reader produces.

A reader knows one code base's layout. It answers `guess_can_open(folder)` (is this folder one
run of mine?), lists the run's rounds from file names alone (`rounds`), and opens one round
(`open_round`) into raw named arrays. Name normalization and pairing of masks with weights are
shared (`names.py`), so a reader stays a page long.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping


@dataclass(frozen=True)
class NameOptions:
    """How raw tensor names become canonical ones."""

    strip_model_prefix: bool = False  # drop a leading "model." (open_lth ImageNet, Lightning)
    select: str | None = None         # keep only names under this prefix, e.g. "encoder_q"


@dataclass(frozen=True)
class Round:
    """One IMP round of a run: where its tensors live, and metrics recorded beside them."""

    index: int
    reader: str
    files: tuple[Path, ...]                   # every file the round reads
    spec: tuple = ()                          # reader-specific locator, e.g. (weights, masks)
    metrics: Mapping[str, float] = field(default_factory=dict)
    # why the round is not complete in its layout (still being written, a partial copy); "" = complete
    incomplete: str = ""
    # (k, parts): reduce only the k-th of `parts` runs of its tensors, so that several threads share
    # one large round (pipeline.py merges the parts back)
    part: tuple[int, int] = (0, 1)


@dataclass
class Run:
    """An IMP run: one trajectory through rounds 0, 1, 2, ... (seed, replicate, task)."""

    path: Path
    format: str
    rounds: list[Round]
    name: str = "."
    notes: list[str] = field(default_factory=list)
    error: str | None = None                  # the layout itself could not be read
    incomplete: dict[int, str] = field(default_factory=dict)   # round -> why it is not analysed

    @property
    def complete_rounds(self) -> list[int]:
        return [r.index for r in self.rounds]

    @property
    def missing_rounds(self) -> list[int]:
        """Round numbers absent (or incomplete) between the first complete round and the last round
        known: a gap before a round still being written is missing too (0, 1, _, 3 being written)."""
        done = self.complete_rounds
        if not done:
            return []
        last = max(done[-1], *self.incomplete) if self.incomplete else done[-1]
        known, unfinished = set(done), set(self.unfinished_rounds)
        return [n for n in range(done[0], last + 1) if n not in known and n not in unfinished]

    @property
    def unfinished_rounds(self) -> list[int]:
        """Incomplete rounds after the last complete one: still being written, or a partial copy."""
        last = max(self.complete_rounds, default=-1)
        return sorted(n for n in self.incomplete if n > last)

    def completeness_warnings(self) -> list[str]:
        """What the user must know about rounds that are not analysed (docs/definitions.md, Gaps)."""
        out = []
        for n in self.unfinished_rounds:
            out.append(f"round {n} is incomplete (still being written?): {self.incomplete[n]}; "
                       f"analysed up to round {max(self.complete_rounds, default=-1)}")
        if self.missing_rounds:
            why = "; ".join(f"round {n}: {self.incomplete[n]}" for n in self.missing_rounds if n in self.incomplete)
            out.append(f"round(s) {', '.join(map(str, self.missing_rounds))} missing inside the run"
                       + (f" ({why})" if why else "") + ": the step across each gap spans several rounds, "
                       "its c measured from the masks")
        return out

    def drop_unfinished(self, index: int, why: str) -> None:
        """Move the last round to `incomplete` (found unreadable as a partial file when read)."""
        self.rounds = [r for r in self.rounds if r.index != index]
        self.incomplete[index] = why


@dataclass
class RawRound:
    """What a reader found in one round's files, before names are normalized."""

    tensors: Mapping[str, Any]                # name -> array-like with .shape (lazy)
    path: Path                                # file holding `tensors` (for messages)
    masks: Mapping[str, Any] | None = None    # a separate masks file, if the layout has one
    mask_path: Path | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)  # found inside the files
    notes: list[str] = field(default_factory=list)              # e.g. calls kept as inert records


@dataclass(frozen=True)
class TensorRef:
    """A canonical tensor of a round: its weight and its mask (None: no mask stored)."""

    name: str
    weight: Any
    mask: Any
    path: Path
    mask_path: Path | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)


class Reader(ABC):
    """A checkpoint layout plugin. Subclasses register themselves in `registry`."""

    name: ClassVar[str]
    description: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()     # optional packages it imports (flowscan/extras.py)

    @abstractmethod
    def guess_can_open(self, folder: Path) -> bool:
        """True if `folder` is one run written in this layout (from names only, cheaply)."""

    @abstractmethod
    def rounds(self, folder: Path) -> tuple[list[Round], list[str]]:
        """The run's rounds in order, and notes on choices made (from names only)."""

    @abstractmethod
    def open_round(self, round: Round) -> RawRound:
        """Open one round's files (lazily: arrays are read when reduced)."""

    def open_run(self, folder: Path) -> Run:
        rounds, notes = self.rounds(folder)
        return Run(path=folder, format=self.name, rounds=[r for r in rounds if not r.incomplete], notes=notes,
                   incomplete={r.index: r.incomplete for r in rounds if r.incomplete})


class FilePerRoundReader(Reader):
    """A layout of one file per round, the files named alike with their round (or step) number.
    Subclasses give `file_pattern`, `what` (for messages) and `read(path) -> (weights, masks)`."""

    file_pattern: ClassVar[re.Pattern]
    what: ClassVar[str]

    @abstractmethod
    def read(self, path: Path) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
        """(weights, masks) of one round's file, lazily; masks empty when it stores none."""

    def files(self, folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if self.file_pattern.match(p.name) and p.is_file())

    def guess_can_open(self, folder: Path) -> bool:
        return bool(self.files(folder))

    def rounds(self, folder: Path) -> tuple[list[Round], list[str]]:
        from flowscan.readers.numbering import rounds_of_numbered_files

        return rounds_of_numbered_files(self.files(folder), self.name, folder, self.what)

    def open_round(self, round: Round) -> RawRound:
        path = round.files[0]
        weights, masks = self.read(path)
        return RawRound(weights, path, masks or None, path if masks else None)
