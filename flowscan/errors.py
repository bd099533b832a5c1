"""Errors that name the file (and tensor) at fault, so a user can act on them."""

from __future__ import annotations

from pathlib import Path


# Control characters (C0, DEL, C1) and the bidirectional overrides that reorder what a terminal
# shows: a name holding them could retitle the terminal, move the cursor or forge a line of output.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_CONTROLS.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})
_CONTROLS.update({c: f"\\u{c:04x}" for c in (0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))})
_CONTROLS_BUT_NEWLINES = {c: v for c, v in _CONTROLS.items() if c != ord("\n")}


def printable(text: str) -> str:
    """A name (or one-line message) safe to print and to store in parquet: bytes of non-UTF-8 file
    names become \\xNN, control characters \\n, \\x1b, ... (escaped, never interpreted)."""
    if text.isprintable():   # the common case, checked in C (surrogates and controls are not printable)
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace").translate(_CONTROLS)


def terminal_safe(text: str) -> str:
    """Output of several lines with every control character but the newline escaped."""
    return text.translate(_CONTROLS_BUT_NEWLINES)


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
