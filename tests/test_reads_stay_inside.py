"""No byte from outside the checkpoint: HDF5 links and storage that reach other files, symbolic links
that leave the scanned folder, remote listings above the URL. And refusals that say the truth."""

from __future__ import annotations

import datetime
import enum
import http
import os
import pathlib
import shutil
import types
import zipfile

import h5py
import numpy as np
import polars as pl
import pytest
import torch

from conftest import FIXTURES, read_tables, run_cli
from flowscan.errors import ScanError
from flowscan.io import torch_file
from flowscan.io.arrays import ROW_LIMIT, ChunkedArray
from test_keras import legacy_file

KERNEL = "fc/kernel:0"


def _archive_with_bad_round(tmp_path, make):
    """A good Keras run and a run whose round 1 is `make(path)`; returns (result, runs rows)."""
    root = tmp_path / "archive"
    shutil.copytree(FIXTURES / "keras" / "closed-form-h5", root / "good")
    bad = root / "bad"
    bad.mkdir()
    legacy_file(bad / "round_0.h5")
    make(bad / "round_1.h5")
    legacy_file(bad / "round_2.h5")
    result = run_cli("analyze", root, "-o", tmp_path / "out", "-q", expect=1)
    runs = {r["run"]: r for r in pl.read_parquet(tmp_path / "out" / "runs.parquet").iter_rows(named=True)}
    assert runs["good"]["status"] == "ok"
    return result, runs["bad"]


def _planted(tmp_path, n=12) -> pathlib.Path:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.full(n, 7.0, np.float32).tobytes())
    return secret


def _swap_kernel(make_kernel):
    def make(path):
        def extra(f, g):
            del g[KERNEL]
            make_kernel(f, g)
        legacy_file(path, extra=extra)
    return make


HDF5_ATTACKS = {
    "external link": lambda secret: _swap_kernel(lambda f, g: g.__setitem__(
        KERNEL, h5py.ExternalLink(str(secret.with_suffix(".h5")), "/data"))),
    "external storage": lambda secret: _swap_kernel(lambda f, g: g.create_dataset(
        KERNEL, shape=(4, 3), dtype=np.float32, external=[(str(secret), 0, 48)])),
    "external storage, relative ../ path": lambda secret: _swap_kernel(lambda f, g: g.create_dataset(
        KERNEL, shape=(4, 3), dtype=np.float32, external=[("../../secret.bin", 0, 48)])),
    "virtual dataset": lambda secret: _swap_kernel(lambda f, g: g.create_virtual_dataset(
        KERNEL, _layout(secret))),
}


def _layout(secret):
    layout = h5py.VirtualLayout(shape=(4, 3), dtype=np.float32)
    layout[:] = h5py.VirtualSource(str(secret.with_suffix(".h5")), "/data", shape=(4, 3))
    return layout


@pytest.mark.parametrize("attack", HDF5_ATTACKS)
def test_hdf5_data_outside_the_file_is_refused_by_name(tmp_path, attack):
    secret = _planted(tmp_path)
    with h5py.File(secret.with_suffix(".h5"), "w") as f:
        f["data"] = np.full((4, 3), 7.0, np.float32)
    result, bad = _archive_with_bad_round(tmp_path, HDF5_ATTACKS[attack](secret))
    assert bad["status"] == "error"
    assert "round_1.h5" in bad["error"] and "reads nothing outside the checkpoint" in bad["error"]
    word = {"external link": "external link", "virtual dataset": "is virtual"}.get(attack, "outside the file")
    assert word in bad["error"]


def test_fill_value_amplification_is_refused_before_reading(tmp_path):
    def make(path):
        legacy_file(path, extra=lambda f, g: g.create_dataset(
            "big:0", shape=(1 << 29,), dtype=np.float32, chunks=(1 << 16,)))   # 2 GiB, nothing stored
        with h5py.File(path, "a") as f:
            g = f["prune_low_magnitude_fc"]
            g.attrs["weight_names"] = [n.encode() for n in (KERNEL, "fc/bias:0", "prune_low_magnitude_fc/mask:0",
                                                            "big:0")]
    _result, bad = _archive_with_bad_round(tmp_path, make)
    assert "declares 2147483648 bytes but stores 0" in bad["error"]


def test_compressed_dataset_is_reduced_in_slices_to_the_exact_sums(tmp_path):
    n = 3 * (1 << 20) + 5
    values = np.ones(n, np.float32)
    values[::7] = -2.0
    path = tmp_path / "round_0.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"dense"]
        g = f.create_group("dense")
        g.attrs["weight_names"] = [b"dense/kernel:0"]
        g.create_dataset("dense/kernel:0", data=values.reshape(1, n), compression="gzip", compression_opts=9)
    from flowscan.readers import keras_h5
    from flowscan.reduce import reduce_tensor
    from flowscan.readers.base import TensorRef

    weights, _masks = keras_h5.read(path)
    kernel = weights["dense.kernel"]
    assert isinstance(kernel, ChunkedArray)
    sums, _bits = reduce_tensor(TensorRef("dense.kernel", kernel, None, path))
    assert sums.abs_sum == float(np.abs(values.astype(np.float64)).sum())


@pytest.mark.parametrize("shape", [(1000,), (1, 700_001), (3, 5, 7), (2, 300_000), (700_000, 3), ()])
def test_chunked_array_reads_flat_ranges_in_bounded_slices(shape):
    full = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    sizes = []

    def read(index):
        part = full[index]
        sizes.append(np.size(part))
        return part

    array = ChunkedArray(shape, np.float32, read)
    flat = full.reshape(-1)
    for start, stop in ((0, flat.size), (1, min(flat.size, 262_145)), (flat.size // 3, flat.size // 2 + 1)):
        sizes.clear()
        np.testing.assert_array_equal(array[start:stop], flat[start:stop])
        assert max(sizes, default=0) <= (stop - start) + 2 * ROW_LIMIT
    np.testing.assert_array_equal(np.asarray(array), full)


# -- symbolic links -------------------------------------------------------------------------
def test_symlink_leaving_the_scanned_folder_is_refused(tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.copytree(FIXTURES / "closed-form" / "safetensors", outside)
    root = tmp_path / "archive"
    shutil.copytree(FIXTURES / "closed-form" / "safetensors", root / "good")
    (root / "linked").mkdir()
    for p in sorted(outside.iterdir()):
        (root / "linked" / p.name).symlink_to(p)
    (root / "folder-link").symlink_to(outside, target_is_directory=True)
    run_cli("analyze", root, "-o", tmp_path / "out", "-q", "--blocks", r"^(a|b)\.", expect=1)
    runs = {r["run"]: r for r in pl.read_parquet(tmp_path / "out" / "runs.parquet").iter_rows(named=True)}
    assert runs["good"]["status"] == "ok"
    for name in ("linked", "folder-link"):
        assert runs[name]["status"] == "error"
        assert "symbolic link" in runs[name]["error"] and "outside" in runs[name]["error"]
        assert str(outside) in runs[name]["error"]


def test_symlink_to_a_sibling_whose_name_extends_the_scanned_folder_is_refused(tmp_path):
    """archive-old is not inside archive, although its path starts with archive's: the test is made on
    whole path components; a file reached through a linked folder inside the archive is read."""
    root, sibling = tmp_path / "archive", tmp_path / "archive-old"
    shutil.copytree(FIXTURES / "closed-form" / "safetensors", sibling)
    shutil.copytree(FIXTURES / "closed-form" / "safetensors", root / "store")
    (root / "through-sibling").mkdir()
    for p in sorted(sibling.iterdir()):
        (root / "through-sibling" / p.name).symlink_to(p)
    (root / "via").symlink_to(root / "store", target_is_directory=True)
    (root / "run-via-linked-folder").mkdir()
    for p in sorted((root / "store").iterdir()):
        (root / "run-via-linked-folder" / p.name).symlink_to(root / "via" / p.name)
    run_cli("analyze", root, "-o", tmp_path / "out", "-q", "--blocks", r"^(a|b)\.", expect=1)
    runs = {r["run"]: r for r in pl.read_parquet(tmp_path / "out" / "runs.parquet").iter_rows(named=True)}
    assert runs["through-sibling"]["status"] == "error" and str(sibling) in runs["through-sibling"]["error"]
    assert runs["run-via-linked-folder"]["status"] == "ok" and runs["store"]["status"] == "ok"


def test_symlink_inside_the_scanned_folder_is_read(tmp_path):
    root = tmp_path / "archive"
    shutil.copytree(FIXTURES / "closed-form" / "safetensors", root / "store")
    (root / "run").mkdir()
    for p in sorted((root / "store").iterdir()):
        (root / "run" / p.name).symlink_to(os.path.relpath(p, root / "run"))
    frames = read_tables_after(tmp_path, root)
    assert set(frames["runs"]["status"]) == {"ok"}


def read_tables_after(tmp_path, root):
    run_cli("analyze", root, "-o", tmp_path / "out", "-q", "--blocks", r"^(a|b)\.")
    return read_tables(tmp_path / "out")


def test_hf_shard_linked_outside_is_refused(tmp_path):
    root = tmp_path / "archive"
    shutil.copytree(FIXTURES / "hf-sharded", root / "run")
    shard = sorted((root / "run" / "step_1").glob("*-of-*.safetensors"))[0]
    moved = tmp_path / "elsewhere.safetensors"
    shutil.move(shard, moved)
    shard.symlink_to(moved)
    run_cli("analyze", root, "-o", tmp_path / "out", "-q", expect=1)
    row = pl.read_parquet(tmp_path / "out" / "runs.parquet").row(0, named=True)
    assert row["status"] == "error" and "symbolic link" in row["error"] and shard.name in row["error"]


# -- refusals that say the truth ------------------------------------------------------------
class Colour(enum.Enum):
    RED = 1


def test_benign_stdlib_values_are_data_not_hostile(tmp_path):
    path = tmp_path / "round_0.pt"
    torch.save({"w": torch.ones(2, 2), "status": http.HTTPStatus.OK, "ns": types.SimpleNamespace(lr=0.1),
                "where": pathlib.PurePosixPath("/data"), "when": datetime.datetime(2024, 1, 2)}, path)
    notes: list[str] = []
    obj = torch_file.load(path, notes)
    assert np.asarray(obj["w"]).sum() == 4
    assert "http.HTTPStatus" in notes[0] and "not executed" in notes[0]


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_sparse_tensors_are_refused_as_unsupported_not_hostile(tmp_path, layout):
    path = tmp_path / "0checkpoint.pth.tar"
    dense = torch.eye(3)
    torch.save({"w": dense.to_sparse() if layout == "coo" else dense.to_sparse_csr()}, path)
    with pytest.raises(ScanError) as info:
        from flowscan.readers.torch_round import open_torch_round
        from flowscan.readers import names
        from flowscan.readers.base import NameOptions
        names.pair(open_torch_round(path), NameOptions())
    assert "sparse tensors are not supported" in str(info.value) and "hostile" not in str(info.value)


def test_quantized_legacy_file_names_the_unsupported_kind(tmp_path):
    path = tmp_path / "q.pt"
    q = torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8)
    torch.save({"w": torch.arange(3.0), "q": q}, path, _use_new_zipfile_serialization=False)
    obj = torch_file.load(path)
    np.testing.assert_array_equal(np.asarray(obj["w"]), [0, 1, 2])   # the other storages still read
    assert "quantized tensors are not supported" in repr(obj["q"])


def test_load_from_bytes_is_named_hostile():
    from flowscan.io.safe_pickle import is_hostile

    assert is_hostile("torch.storage", "_load_from_bytes")
    assert not is_hostile("http", "HTTPStatus") and not is_hostile("types", "SimpleNamespace")
    assert is_hostile("http", "client.HTTPConnection") and is_hostile("types", "FunctionType")


# -- zip containers whose directories disagree ---------------------------------------------------
def _rewrite(path, mutate):
    raw = bytearray(path.read_bytes())
    mutate(raw)
    path.write_bytes(bytes(raw))


def _torch_zip(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"w": torch.arange(12.0).reshape(3, 4)}, path)
    return path


def _entries(raw: bytearray, signature: bytes, name_at: int, name_len_at: int):
    """(offset, name) of each zip header with this signature (local: PK\\3\\4, central: PK\\1\\2)."""
    pos = raw.find(signature)
    while pos >= 0:
        n = int.from_bytes(raw[pos + name_len_at:pos + name_len_at + 2], "little")
        yield pos, bytes(raw[pos + name_at:pos + name_at + n])
        pos = raw.find(signature, pos + 4)


def _storage_member(path) -> bytes:
    with zipfile.ZipFile(path) as zf:
        return next(i.filename for i in zf.infolist() if "/data/" in i.filename).encode()


@pytest.mark.parametrize("flag", [0x1, 0x20, 0x40])
def test_zip_members_flagged_encrypted_or_patched_are_refused(tmp_path, flag):
    path = _torch_zip(tmp_path)
    name = _storage_member(path)

    def mutate(raw):
        for pos, found in _entries(raw, b"PK\x01\x02", 46, 28):   # the central directory entry
            if found == name:
                raw[pos + 8] |= flag
    _rewrite(path, mutate)
    with pytest.raises(ScanError, match="refused"):
        np.asarray(torch_file.load(path)["w"])


def test_local_and_central_names_that_disagree_are_refused(tmp_path):
    path = _torch_zip(tmp_path)
    name = _storage_member(path)

    def mutate(raw):
        for pos, found in _entries(raw, b"PK\x03\x04", 30, 26):   # the local header names another member
            if found == name:
                raw[pos + 30 + len(name) - 1] ^= 0x01
    _rewrite(path, mutate)
    with pytest.raises(ScanError, match="directories disagree"):
        np.asarray(torch_file.load(path)["w"])


def test_second_pickle_stream_in_data_pkl_is_refused(tmp_path):
    import pickle
    import io

    path = _torch_zip(tmp_path)
    with zipfile.ZipFile(path) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    members[pkl] += pickle.dumps(("os", "system"), protocol=2)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for n, data in members.items():
            zf.writestr(n, data)
    path.write_bytes(buf.getvalue())
    with pytest.raises(ScanError, match="after its pickle"):
        torch_file.load(path)


# -- Orbax: kvstore paths and chunk counts ----------------------------------------------------
def test_orbax_keys_that_would_leave_the_folder_are_refused(tmp_path):
    import json

    from test_orbax import hand_made

    folder = hand_made(tmp_path / "run", 0, {"params.w": np.ones((2, 2), np.float32)})
    meta = json.loads((folder / "_METADATA").read_text())
    entry = next(iter(meta["tree_metadata"].values()))
    for bad in ("../../etc", "a/b", "..\\x"):
        entry["key_metadata"][-1]["key"] = bad
        meta["tree_metadata"] = {"x": entry}
        (folder / "_METADATA").write_text(json.dumps(meta))
        from flowscan.io import orbax_store
        with pytest.raises(ScanError, match="malformed key"):
            orbax_store.tree(folder)


def test_orbax_array_of_millions_of_chunks_is_refused_before_reading(tmp_path):
    import json

    import tensorstore as ts

    from flowscan.io import orbax_store

    folder = tmp_path / "run" / "0"
    folder.mkdir(parents=True)
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(folder / "params.w") + "/"},
            "metadata": {"shape": [4_000_000], "chunks": [1], "dtype": "<f4"}}
    ts.open(spec, create=True).result()   # metadata only: every chunk is the fill value
    meta = {"tree_metadata": {"('params', 'w')": {
        "key_metadata": [{"key": "params", "key_type": 2}, {"key": "w", "key_type": 2}],
        "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False}}},
        "use_ocdbt": False, "use_zarr3": False}
    (folder / "_METADATA").write_text(json.dumps(meta))
    with pytest.raises(ScanError, match="4000000 chunks"):
        orbax_store.tree(folder)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
@pytest.mark.parametrize("protocol", [0, 1])
def test_plain_pickles_under_torch_names_are_named_hostile(tmp_path, suffix, protocol):
    import hostile

    canary = tmp_path / "CANARY"
    path = tmp_path / f"round_1{suffix}"
    path.write_bytes(hostile.dumps(hostile._canary_call("os", "system", canary), protocol=protocol))
    assert torch_file.is_torch_file(path)
    with pytest.raises(ScanError, match="names os.system, which can run code"):
        torch_file.load(path)
    assert not canary.exists()
    path.write_bytes(hostile.dumps({"w": 1}, protocol=protocol))   # harmless, but still no torch file
    with pytest.raises(ScanError, match="a plain pickle, not a torch checkpoint"):
        torch_file.load(path)


def test_a_flipped_tensor_byte_fails_its_run_by_default_and_not_with_no_verify(tmp_path):
    run = tmp_path / "archive" / "run"
    shutil.copytree(FIXTURES / "closed-form" / "prune-style", run)
    target = run / "1checkpoint.pth.tar"
    raw = bytearray(target.read_bytes())
    from flowscan.io.zip_members import data_offset

    with open(target, "rb") as f, zipfile.ZipFile(f) as zf:
        info = next(i for i in zf.infolist() if "/data/" in i.filename and i.file_size > 64)
        start = data_offset(f, info)
    raw[start + 40] ^= 0x20   # inside the tensor's bytes (torch pads the local header's extra field)
    target.write_bytes(bytes(raw))
    run_cli("analyze", run.parent, "-o", tmp_path / "out", "-q", expect=1)
    error = pl.read_parquet(tmp_path / "out" / "runs.parquet")["error"][0]
    assert "fails its CRC-32 check" in error and str(target) in error
    run_cli("analyze", run.parent, "-o", tmp_path / "unchecked", "-q", "--no-verify")   # read as it is


def test_the_fast_crc_agrees_with_zlib():
    import zlib

    from flowscan.io import arrays

    data = np.random.default_rng(0).bytes(1 << 20)
    assert arrays.FAST_CRC
    assert arrays.crc32(data[1000:], arrays.crc32(data[:1000])) == zlib.crc32(data)
