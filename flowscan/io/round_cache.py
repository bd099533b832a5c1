"""The per-round cache, so an interrupted analysis resumes: append-only logs of reduced rounds.

Each analysis that reduces something appends to a log of its own in the cache folder, one record
per round, written as soon as the round is reduced (records are gathered for up to FLUSH_SECONDS
or FLUSH_BYTES and written with one `write`: a kill -9 costs at most that much work):

    b"FSR2" | u32 CRC-32 of the body | u64 length of the body | body
    body = u16 length of the key | key | u64 length of the JSON | JSON {..., "bits": [[name, nbytes], ...]}
           | the packed mask bits, in order

A kill -9 can only cut the last record of a log short; reading stops there, and a record whose
CRC does not match is recomputed, never trusted. One file per analysis (not per round) because
for thousands of small checkpoints the opens and renames of per-round files were a third of
the analysis; one writer per log because concurrent appends from several processes could
interleave. Logs are merged into one when more than MAX_LOGS have piled up (those untouched for
SETTLED_SECONDS: a log written to lately may be another running analysis's).
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import numpy as np

from flowscan.io.arrays import crc32
from flowscan.reduce import RoundSums

MAGIC = b"FSR2"
HEADER = struct.Struct("<4sIQ")      # magic, CRC-32 of the body, length of the body
MAX_LOGS = 8
SETTLED_SECONDS = 60.0   # a log untouched this long is no other analysis's open log
FLUSH_SECONDS = 0.5
FLUSH_BYTES = 256 << 10


class RoundCache:
    """Reduced rounds by key, read from and appended to the logs in `folder`."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._index: dict[str, tuple[Path, int, int]] = {}   # key -> (log, offset of the body, length)
        self._log: int | None = None                         # our own log's descriptor, opened lazily
        self._pending: list[tuple[str, bytes]] = []           # records not yet written
        self._pending_bytes, self._flushed_at = 0, time.monotonic()
        logs = sorted(self.folder.glob("*.log")) if self.folder.is_dir() else []
        for log in logs:
            self._index_log(log)
        # logs written to lately may belong to an analysis still running beside this one: kept
        settled = [log for log in logs if _age(log) > SETTLED_SECONDS]
        if len(settled) > MAX_LOGS:
            self._merge(settled)

    def __len__(self) -> int:
        return len(self._index)

    def get(self, key: str) -> RoundSums | None:
        """The cached round, or None when absent or damaged (then it is recomputed)."""
        if self._pending:
            self.flush()
        where = self._index.get(key)
        if where is None:
            return None
        log, offset, length = where
        try:
            with open(log, "rb") as f:
                f.seek(offset - HEADER.size)
                record = f.read(HEADER.size + length)
            return _decode(record, key)
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            return None

    def put(self, key: str, sums: RoundSums) -> None:
        record = _encode(key, sums)
        self._pending.append((key, record))
        self._pending_bytes += len(record)
        if self._pending_bytes >= FLUSH_BYTES or time.monotonic() - self._flushed_at >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write the gathered records to this session's log (created on the first write)."""
        self._flushed_at = time.monotonic()
        if not self._pending:
            return
        if self._log is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"rounds-{time.time_ns()}-{os.getpid()}.log"
            self._log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
            self._path, self._size = path, 0
        data = b"".join(record for _key, record in self._pending)
        written = os.write(self._log, data)
        if written != len(data):   # a full disk: the cut record is ignored when read
            raise OSError(f"{self._path}: wrote {written} of {len(data)} bytes")
        for key, record in self._pending:
            self._index[key] = (self._path, self._size + HEADER.size, len(record) - HEADER.size)
            self._size += len(record)
        self._pending, self._pending_bytes = [], 0

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._log is not None:
                os.close(self._log)
                self._log = None

    def __enter__(self) -> "RoundCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _index_log(self, log: Path) -> None:
        """Record where each complete record of `log` is; stop at the first cut or foreign one."""
        try:
            f = open(log, "rb")
        except OSError:
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            at = 0
            while at + HEADER.size + 2 <= size:
                head = f.read(HEADER.size + 2)
                magic, _crc, length = HEADER.unpack_from(head)
                if magic != MAGIC or at + HEADER.size + length > size:
                    return
                (key_length,) = struct.unpack_from("<H", head, HEADER.size)
                key = f.read(key_length).decode("ascii", "replace")
                self._index[key] = (log, at + HEADER.size, length)
                at += HEADER.size + length
                f.seek(at)

    def _merge(self, logs: list[Path]) -> None:
        """One log of every record `logs` hold (written whole, then renamed into place); the logs'
        records are then read from it."""
        merged = self.folder / f"rounds-{time.time_ns()}-{os.getpid()}-merged.log"
        tmp = merged.with_suffix(".tmp")
        moved, at = {}, 0
        chosen = set(logs)
        try:
            with open(tmp, "wb") as out:
                for key, (log, offset, length) in self._index.items():
                    if log not in chosen:
                        continue
                    with open(log, "rb") as f:
                        f.seek(offset - HEADER.size)
                        record = f.read(HEADER.size + length)
                    out.write(record)
                    moved[key] = (merged, at + HEADER.size, length)
                    at += len(record)
            os.replace(tmp, merged)
        except OSError:
            tmp.unlink(missing_ok=True)
            return
        self._index.update(moved)
        for log in logs:
            log.unlink(missing_ok=True)


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _encode(key: str, sums: RoundSums) -> bytes:
    bits = [np.ascontiguousarray(b) for b in sums.bits.values()]
    header = {**sums.to_json(), "bits": [[name, int(b.nbytes)] for name, b in zip(sums.bits, bits)]}
    text = json.dumps(header).encode()
    raw_key = key.encode("ascii")
    body = b"".join([struct.pack("<H", len(raw_key)), raw_key, struct.pack("<Q", len(text)), text,
                     *(b.tobytes() for b in bits)])
    return HEADER.pack(MAGIC, crc32(body), len(body)) + body


def _decode(record: bytes, key: str) -> RoundSums | None:
    magic, crc, length = HEADER.unpack_from(record)
    body = memoryview(record)[HEADER.size:]
    if magic != MAGIC or len(body) != length or crc32(body) != crc:
        return None
    (key_length,) = struct.unpack_from("<H", body)
    if bytes(body[2:2 + key_length]).decode("ascii", "replace") != key:
        return None
    at = 2 + key_length
    (n,) = struct.unpack_from("<Q", body, at)
    header = json.loads(bytes(body[at + 8:at + 8 + n]))
    at += 8 + n
    bits = {}
    for name, size in header.pop("bits"):
        if at + size > length:
            return None
        bits[name] = np.frombuffer(record, np.uint8, size, HEADER.size + at)
        at += size
    if at != length:
        return None
    sums = RoundSums.from_json(header)
    return RoundSums(sums.index, sums.tensors, sums.metrics, bits, sums.notes)
