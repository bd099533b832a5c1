"""Zip archive facts both torch.save files and .npz archives need, read without trusting them."""

from __future__ import annotations

import struct
import zipfile
from collections import Counter
from pathlib import Path

from flowscan.errors import ScanError
from flowscan.io.location import read_at, read_ranges


def data_offset(raw, info: zipfile.ZipInfo) -> int:
    """Where a member's bytes start in the archive file (after its local header)."""
    # pread, not a memory map: touching a page of the map pulls its neighbours into memory
    # too, and an archive has a header before every member
    return _after_header(info, read_at(raw, 30, info.header_offset))


def data_offsets(raw, infos: list[zipfile.ZipInfo]) -> dict[str, int]:
    """`data_offset` of many members; from a store, all their local headers in one batch of
    concurrent range requests (one request per member in turn would cost a round trip each)."""
    headers = read_ranges(raw, [(info.header_offset, 30) for info in infos])
    return {info.filename: _after_header(info, header) for info, header in zip(infos, headers)}


def _after_header(info: zipfile.ZipInfo, header: bytes) -> int:
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise ScanError(None, f"member {info.filename!r} has no valid local zip header")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def unique_members(path: Path, zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """Members by name; an archive that lists a name twice is refused (which copy is meant?)."""
    infos = zf.infolist()
    twice = [n for n, c in Counter(i.filename for i in infos).items() if c > 1]
    if twice:
        raise ScanError(path, f"archive lists member {twice[0]!r} twice (which copy is meant?)")
    return {i.filename: i for i in infos}
