"""The per-round cache: one file per reduced round, so an interrupted analysis resumes.

A file is the round's sums as JSON and its packed mask bits, back to back:

    b"FSR1" | u64 length of the JSON | JSON {..., "bits": [[name, nbytes], ...]} | the bits, in order

It is written under a temporary name and renamed into place (a kill -9 leaves either the whole
entry or none), in one write: no zip container, no second file, no temporary-file dance per round
(for thousands of small checkpoints those were a third of the analysis).
"""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

import numpy as np

from flowscan.reduce import RoundSums

MAGIC = b"FSR1"


def load(path: Path) -> RoundSums | None:
    """The cached round, or None when absent or damaged (then it is recomputed)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    try:
        if data[:4] != MAGIC:
            return None
        (n,) = struct.unpack_from("<Q", data, 4)
        header = json.loads(data[12:12 + n])
        bits, at = {}, 12 + n
        for name, size in header.pop("bits"):
            if at + size > len(data):
                return None
            bits[name] = np.frombuffer(data, np.uint8, size, at)
            at += size
        if at != len(data):
            return None
        sums = RoundSums.from_json(header)
    except (ValueError, KeyError, TypeError, struct.error):
        return None
    return RoundSums(sums.index, sums.tensors, sums.metrics, bits, sums.notes)


def store(path: Path, sums: RoundSums) -> None:
    header = {**sums.to_json(), "bits": [[name, int(b.nbytes)] for name, b in sums.bits.items()]}
    text = json.dumps(header).encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        f = open(tmp, "wb")
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(tmp, "wb")
    try:
        with f:
            f.write(b"".join([MAGIC, struct.pack("<Q", len(text)), text,
                              *(np.ascontiguousarray(b).tobytes() for b in sums.bits.values())]))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
