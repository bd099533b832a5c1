"""Malformed files of every non-pickle kind, and discovery surprises: each is a named error of
its own run, beside a good run that is still analysed (and exit code 1)."""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import read_tables, run_cli
from flowscan.errors import ScanError
from flowscan.io import npz_file, safetensors_file, torch_file
from flowscan.io.safe_pickle import safe_loads


def _one_bad_run(tmp_path, copy_fixture, fixture: str) -> tuple[Path, Path]:
    root = tmp_path / "runs"
    copy_fixture("closed-form/safetensors", "runs/good")
    return root, copy_fixture(fixture, "runs/bad")


def _bad_run_error(root: Path, out: Path) -> str:
    result = run_cli("analyze", root, "-o", out, "-q", expect=1)
    runs = {r["run"]: r for r in read_tables(out)["runs"].iter_rows(named=True)}
    assert runs["good"]["status"] == "ok", runs["good"]
    bad = [r for name, r in runs.items() if name != "good"]
    assert bad and all(r["status"] == "error" for r in bad), bad
    assert "Traceback" not in result.output
    return bad[0]["error"]


def _header(entries: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(entries).encode()
    return struct.pack("<Q", len(raw)) + raw + data


SAFETENSORS_CASES = {
    "no data_offsets": ({"w": {"dtype": "F32", "shape": [2]}}, "has no 'data_offsets'"),
    "no shape": ({"w": {"dtype": "F32", "data_offsets": [0, 8]}}, "has no 'shape'"),
    "unknown dtype": ({"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, "unsupported dtype 'F8_E4M3'"),
    "dtype not a string": ({"w": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, "unsupported dtype"),
    "negative size": ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "non-negative integers"),
    "float size": ({"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, "non-negative integers"),
    "bool size": ({"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, "non-negative integers"),
    "offsets reversed": ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, "does not match shape"),
    "offsets past the end": ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [800, 808]}}, "past the end"),
    "offsets of strings": ({"w": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}, "pair of integers"),
    "entry not an object": ({"w": [1, 2]}, "not a JSON object"),
    "metadata not an object": ({"__metadata__": [1]}, "__metadata__ is not a JSON object"),
    "huge shape": ({"w": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 8]}}, "does not match shape"),
}


@pytest.mark.parametrize("case", list(SAFETENSORS_CASES))
def test_malformed_safetensors_headers_are_named(tmp_path, case):
    entries, message = SAFETENSORS_CASES[case]
    path = tmp_path / "x.safetensors"
    path.write_bytes(_header(entries, b"\x00" * 8))
    with pytest.raises(ScanError, match=message) as info:
        safetensors_file.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("raw, message", [
    (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": {}}', "appears twice"),
    (b"[" * 100_000 + b"]" * 100_000, "nests too deeply|not a JSON object"),
    (b'{"w": NaN}', "not a JSON object"),
    (b"\xff\xfe", "unreadable safetensors header"),
])
def test_safetensors_headers_that_json_would_misread(tmp_path, raw, message):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x00" * 4)
    with pytest.raises(ScanError, match=message):
        safetensors_file.load(path)


def test_giant_safetensors_header_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(ScanError, match="does not fit"):
        safetensors_file.load(path)


def test_npz_damage_is_named(tmp_path):
    np.savez(tmp_path / "a.npz", w=np.arange(1000.0))
    raw = bytearray((tmp_path / "a.npz").read_bytes())
    raw[raw.index(np.arange(1000.0)[500:501].tobytes())] ^= 1      # one flipped bit in the data
    (tmp_path / "flipped.npz").write_bytes(bytes(raw))
    arrays = npz_file.load(tmp_path / "flipped.npz")
    from flowscan.readers.base import TensorRef
    from flowscan.reduce import reduce_tensor
    with pytest.raises(ScanError, match="CRC-32"):
        reduce_tensor(TensorRef("w", arrays["w"], None, tmp_path / "flipped.npz"), verify=True)
    (tmp_path / "short.npz").write_bytes(bytes(raw[:300]))
    with pytest.raises(ScanError, match="not a readable .npz"):
        npz_file.load(tmp_path / "short.npz")
    with zipfile.ZipFile(tmp_path / "lies.npz", "w") as zf:  # header claims more than the member holds
        zf.writestr("w.npy", b"\x93NUMPY\x01\x00v\x00{'descr': '<f8', 'fortran_order': False, 'shape': (100000,), }"
                    .ljust(128 + 10, b" ")[:127] + b"\n" + b"\x00" * 16)
    with pytest.raises(ScanError, match=r"shape \(100000,\) needs 800000 bytes but its member holds 16"):
        npz_file.load(tmp_path / "lies.npz")


def test_a_spoofed_stub_is_not_an_array_to_numpy():
    # the class is unknown, so it is a stub; its pickled state claims an array interface
    import hostile

    data = hostile.dumps(hostile.Build(hostile.New(hostile.Global("evil", "Fake")), {
        "__array_interface__": {"data": (4096, False), "shape": (16,), "typestr": "|O"}, "shape": (4,)}))
    obj = safe_loads(data)
    assert np.asarray(obj).dtype == object and np.asarray(obj).shape == ()
    assert not hasattr(obj, "shape") and not hasattr(obj, "__array_interface__")


@pytest.mark.parametrize("manifest", ["[]", '"text"', "null", "[" * 50_000 + "]" * 50_000,
                                      '{"metrics": [1, 2]}', '{"metrics": {"acc": "high"}}'])
def test_malformed_round_manifest_costs_only_its_run(tmp_path, copy_fixture, manifest):
    root, bad = _one_bad_run(tmp_path, copy_fixture, "closed-form/flowscan")
    (bad / "round_0002" / "round.json").write_text(manifest)
    if manifest == '{"metrics": {"acc": "high"}}':   # a non-number metric is skipped, not an error
        run_cli("analyze", root, "-o", tmp_path / "out", "-q")
        return
    error = _bad_run_error(root, tmp_path / "out")
    assert "round.json" in error


@pytest.mark.parametrize("index", ['[]', '{"weight_map": ["a"]}', '{"weight_map": {"w": "../../etc/passwd"}}',
                                   '{"weight_map": {"w": "/etc/passwd"}}', '{"weight_map": {"w": 7}}', "{{"])
def test_shard_index_must_name_files_beside_it(tmp_path, copy_fixture, index):
    root, bad = _one_bad_run(tmp_path, copy_fixture, "hf-sharded")
    (bad / "step_1" / "model.safetensors.index.json").write_text(index)
    error = _bad_run_error(root, tmp_path / "out")
    assert "model.safetensors.index.json" in error


def test_bert_result_with_an_unknown_codec_is_a_named_error(tmp_path, copy_fixture):
    root, bad = _one_bad_run(tmp_path, copy_fixture, "bert-tickets/mrpc")
    (bad / "result.pt").write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00nope!\x86R.")
    with zipfile.ZipFile(bad / "result2.pt", "w") as zf:
        zf.writestr("archive/data.pkl", (bad / "result.pt").read_bytes())
    (bad / "result2.pt").replace(bad / "result.pt")
    error = _bad_run_error(root, tmp_path / "out")
    assert "result.pt" in error and "_codecs.encode" in error


def test_non_utf8_run_folder_names_are_written_safely(tmp_path, copy_fixture):
    root = tmp_path / "runs"
    copy_fixture("closed-form/safetensors", "runs/good")
    odd = os.fsdecode(b"seed_\xff\xfe")
    target = root / odd
    copy_fixture("closed-form/safetensors", f"runs/{odd}")
    (target / "round_3.safetensors").write_bytes(b"garbage")
    run_cli("analyze", root, "-o", tmp_path / "out", "-q", expect=1)
    runs = read_tables(tmp_path / "out")["runs"]
    assert sorted(runs["run"].to_list()) == ["good", "seed_\\xff\\xfe"]


def test_legacy_file_whose_data_section_disagrees_with_its_pickle(tmp_path):
    import torch

    path = tmp_path / "x.pt"
    torch.save({"w": torch.arange(10.0)}, path, _use_new_zipfile_serialization=False)
    raw = bytearray(path.read_bytes())
    at = raw.rindex(struct.pack("<q", 10))      # the data section's element count
    raw[at:at + 8] = struct.pack("<q", 10**12)
    path.write_bytes(bytes(raw))
    with pytest.raises(ScanError, match="holds 1000000000000 elements, but the pickle declares 10"):
        torch_file.load(path)


def test_each_file_gets_fresh_allow_list_objects(tmp_path):
    # a file that tries to retype FloatStorage is refused, and the next file reads as float32
    import torch

    torch.save({"w": torch.arange(4.0)}, tmp_path / "good.pt")
    evil = b"\x80\x02ctorch\nFloatStorage\nN}X\x06\x00\x00\x00_valueX\x05\x00\x00\x00int64s\x86b."
    with zipfile.ZipFile(tmp_path / "evil.pt", "w") as zf:
        zf.writestr("archive/data.pkl", evil)
    with pytest.raises(ScanError, match="refused"):
        torch_file.load(tmp_path / "evil.pt")
    np.testing.assert_array_equal(np.asarray(torch_file.load(tmp_path / "good.pt")["w"]), np.arange(4.0, dtype=np.float32))


@pytest.mark.parametrize("shape", ["(-200,)", "(4, -1)", "(True,)"])
def test_npy_shapes_that_are_not_sizes_are_named(tmp_path, shape):
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}".encode()
    header = b"\x93NUMPY\x01\x00" + struct.pack("<H", 118) + header.ljust(117, b" ") + b"\n"
    with zipfile.ZipFile(tmp_path / "neg.npz", "w") as zf:
        zf.writestr("w.npy", header + b"\x00" * 16)
    with pytest.raises(ScanError, match=r"gives shape .*not non-negative integers") as info:
        npz_file.load(tmp_path / "neg.npz")
    assert "needs -" not in str(info.value)
