"""A small fuzzing budget over every reader (tests/fuzzing.py); long runs live in
benchmarks/fuzz_readers.py. No mutated file may raise an unnamed exception, hang or crash the
reading process, and no flipped byte of a zip checkpoint may change the data silently."""

from __future__ import annotations

import pytest

import fuzzing

CASES = 150   # per format; a few seconds in all


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    examples: dict = {}
    counts = fuzzing.run(tmp_path_factory.mktemp("fuzz"), cases=CASES, timeout=60, examples=examples)
    return counts, examples


@pytest.mark.parametrize("fmt", fuzzing.FORMATS)
def test_mutated_files_are_read_or_refused_by_name(outcomes, fmt):
    counts, examples = outcomes
    assert sum(counts[fmt].values()) == CASES
    defects = {k: counts[fmt][k] for k in ("unnamed", "hang", "crash") if counts[fmt][k]}
    assert not defects, (defects, examples.get(fmt))


def test_flipped_bytes_of_zip_checkpoints_never_change_data_silently(outcomes):
    counts, examples = outcomes
    assert counts["zip-bytes"]["changed"] == 0, examples.get("zip-bytes")
    assert counts["zip-bytes"]["named"] > 0   # the mutations do reach the reader
