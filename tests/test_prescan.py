"""The opcode pre-scan (one loop over a table from pickletools) against pickletools' own walk."""

from __future__ import annotations

import collections
import datetime
import io
import pickle
import pickletools

import numpy as np
import pytest

from flowscan.errors import ScanError
from flowscan.io.safe_pickle import MAX_STACK_DEPTH, prescan

OBJECTS = [1, -7, 2 ** 100, -2 ** 300, 1.5, None, True, "x" * 300, "é" * 70_000, b"y" * 70_000, bytearray(b"abc"),
           list(range(1000)), {"a": [1, 2, (3, 4)], "b": {1, 2}}, collections.OrderedDict(a=1), np.arange(10),
           datetime.datetime(2024, 5, 6), ("t",) * 50, frozenset({1, 2})]


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_prescan_ends_where_pickletools_ends(protocol):
    for obj in OBJECTS:
        data = pickle.dumps(obj, protocol=protocol)
        stream = io.BytesIO(data + b"after the pickle")
        scanned = prescan(stream, "x")
        end = max(pos for _op, _arg, pos in pickletools.genops(io.BytesIO(data))) + 1
        assert scanned == data[:end] and stream.tell() == end


@pytest.mark.parametrize("data, message", [
    (b"K\x01r\xff\xff\xff\x7f.", "out of order"),
    (b"j\xff\xff\xff\x00.", "never stored"),
    (b"(" * (MAX_STACK_DEPTH + 2) + b".", "nests more than"),
    (b"\x80\x02cos\nsystem\nq\x00X\x05\x00\x00\x00tou", "ends before its STOP"),
    (b"\xff.", "unknown opcode"),
    (b"0.", "empty stack"),
])
def test_prescan_refuses_resource_tricks_and_malformed_streams(data, message):
    with pytest.raises(ScanError, match=message):
        prescan(io.BytesIO(data), "x")


def test_prescan_reads_past_its_first_block_and_respects_the_limit():
    data = pickle.dumps(b"z" * (3 << 20), protocol=4)
    assert prescan(io.BytesIO(data), "x") == data
    with pytest.raises(ScanError, match="over 1000 bytes"):
        prescan(io.BytesIO(data), "x", max_bytes=1000)


def test_a_repeated_pickle_is_walked_once_and_a_refused_one_every_time(monkeypatch):
    from flowscan.io import safe_pickle

    walks = []
    real = safe_pickle._scan
    monkeypatch.setattr(safe_pickle, "_scan", lambda data, path: walks.append(data) or real(data, path))
    monkeypatch.setattr(safe_pickle, "_passed", safe_pickle._Passed())
    data = pickle.dumps({"w": list(range(50))}, protocol=2)
    for _ in range(3):
        assert prescan(io.BytesIO(data), "x") == data
    assert len(walks) == 1          # the rounds of a run hold the same pickle: one walk
    bad = b"K\x01r\xff\xff\xff\x7f."
    for _ in range(2):              # a refusal is never remembered as a pass
        with pytest.raises(ScanError, match="out of order"):
            prescan(io.BytesIO(bad), "x")
    assert len(walks) == 3
    other = pickle.dumps({"w": list(range(51))}, protocol=2)   # one byte apart: walked on its own
    assert prescan(io.BytesIO(other), "x") == other and len(walks) == 4
