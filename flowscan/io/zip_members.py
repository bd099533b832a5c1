"""Zip archive facts both torch.save files and .npz archives need, read without trusting them."""

from __future__ import annotations

import struct
import zipfile
from collections import Counter
from pathlib import Path

from flowscan.errors import ScanError
from flowscan.io.location import read_at, read_ranges


# general-purpose flag bits a reader of raw member bytes cannot honour: encrypted (0x1), compressed
# patched data (0x20), strong encryption (0x40); their bytes are not the member's data
_UNREADABLE_FLAGS = {0x1: "encrypted", 0x20: "patched data", 0x40: "strongly encrypted"}


def data_offset(raw, info: zipfile.ZipInfo, path=None) -> int:
    """Where a member's bytes start in the archive file (after its local header)."""
    # pread, not a memory map: touching a page of the map pulls its neighbours into memory
    # too, and an archive has a header before every member
    return _after_header(info, read_at(raw, _header_bytes(info), info.header_offset), path)


def data_offsets(raw, infos: list[zipfile.ZipInfo], path=None) -> dict[str, int]:
    """`data_offset` of many members; from a store, all their local headers in one batch of
    concurrent range requests (one request per member in turn would cost a round trip each)."""
    headers = read_ranges(raw, [(info.header_offset, _header_bytes(info)) for info in infos])
    return {info.filename: _after_header(info, header, path) for info, header in zip(infos, headers)}


def _raw_name(info: zipfile.ZipInfo) -> bytes:
    return info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437", "surrogateescape")


def _header_bytes(info: zipfile.ZipInfo) -> int:
    return 30 + len(_raw_name(info))


def _after_header(info: zipfile.ZipInfo, header: bytes, path=None) -> int:
    """The offset after a member's local header, which must agree with the central directory:
    scanners and loaders that read different headers of one archive see different files."""
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise ScanError(path, f"member {info.filename!r} has no valid local zip header")
    check_flags(info, path)
    flags, method = struct.unpack("<HH", header[6:10])
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    if header[30:30 + name_len] != _raw_name(info) or name_len != len(_raw_name(info)):
        raise ScanError(path, f"member {info.filename!r} is named {header[30:30 + name_len]!r} in its local "
                              "header: the archive's two directories disagree (refused)")
    if method != info.compress_type or any(flags & bit for bit in _UNREADABLE_FLAGS):
        raise ScanError(path, f"member {info.filename!r}: its local header says compression {method}, flags "
                              f"{flags:#x}; the central directory {info.compress_type}, {info.flag_bits:#x} (refused)")
    return info.header_offset + 30 + name_len + extra_len


def check_flags(info: zipfile.ZipInfo, path=None) -> None:
    """Refuse members whose stored bytes are not their data (encrypted, patched)."""
    found = [what for bit, what in _UNREADABLE_FLAGS.items() if info.flag_bits & bit]
    if found:
        raise ScanError(path, f"member {info.filename!r} is {' and '.join(found)} (zip flag bits "
                              f"{info.flag_bits:#x}): its bytes are not its data (refused)")


def unique_members(path: Path, zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """Members by name; an archive that lists a name twice is refused (which copy is meant?)."""
    infos = zf.infolist()
    twice = [n for n, c in Counter(i.filename for i in infos).items() if c > 1]
    if twice:
        raise ScanError(path, f"archive lists member {twice[0]!r} twice (which copy is meant?)")
    for info in infos:
        check_flags(info, path)
    start = min((i.header_offset for i in infos), default=0)
    if start:
        # zipfile finds an archive from its end, so bytes before it go unread here; torch.load,
        # numpy.load and Keras look at the first bytes, see no zip and unpickle them
        raise ScanError(path, f"the zip archive starts at byte {start}, after {start} bytes of something "
                              "else: a disguised file (torch.load would read those bytes as a pickle "
                              "and run it); refused")
    return {i.filename: i for i in infos}
