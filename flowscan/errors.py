"""Errors that name the file (and tensor) at fault, so a user can act on them."""

from __future__ import annotations

from pathlib import Path


def printable(text: str) -> str:
    """Text safe to print and to store in parquet: bytes of non-UTF-8 file names become \\xNN."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class FlowscanError(Exception):
    """Base class for errors flowscan reports to the user."""


class ScanError(FlowscanError):
    """A checkpoint could not be read or fails a sanity check."""

    def __init__(self, path: str | Path | None, message: str, tensor: str | None = None, *,
                 truncated: bool = False):
        self.path = printable(str(path)) if path is not None else None
        self.tensor = tensor
        self.message = message
        # the file ends early: a partial copy, or a file still being written (the last round of a
        # run in progress is then an incomplete round, not a failed run)
        self.truncated = truncated
        parts = [p for p in (self.path, f"tensor {tensor!r}" if tensor else None, message) if p]
        super().__init__(": ".join(parts))

    def __reduce__(self):  # survive the trip back from a worker process
        return (_rebuild, (type(self), self.path, self.message, self.tensor, self.truncated))


def _rebuild(cls, path, message, tensor, truncated):
    return cls(path, message, tensor, truncated=truncated)


class UnsafePickleError(ScanError):
    """A pickle names a callable outside the allow-list; nothing it names was run."""
