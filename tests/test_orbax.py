"""The Orbax reader: fixtures written by orbax-checkpoint itself (fixtures/make_orbax_fixtures.py),
values against the closed form and the same IMP run as Flax msgpack files, checkpoints built with
tensorstore by hand (no OCDBT, zarr3, huge declared shapes), and every malformed metadata field.
Needs only tensorstore (no jax)."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from conftest import FIXTURES, analyze, run_cli
from flowscan.errors import ScanError
from flowscan.io import orbax_store
from flowscan.readers import orbax

ts = pytest.importorskip("tensorstore")
ORBAX = FIXTURES / "orbax"


def test_checkpoint_manager_run_equals_the_same_run_in_flax_msgpack(tmp_path):
    """The same JAX IMP run saved by an orbax CheckpointManager (<step>/default/) and by flax's
    msgpack checkpoints: masks from opt_state/masks (not Adam's mu/nu), identical tables."""
    a = analyze(ORBAX / "imp-mlp", tmp_path / "orbax")
    b = analyze(FIXTURES / "flax" / "imp-mlp", tmp_path / "flax")
    for table in ("rounds", "steps", "eigen", "survival"):
        assert_frame_equal(a[table], b[table], check_exact=True)
    runs = a["runs"].row(0, named=True)
    assert runs["mask_source"] == "stored" and runs["n_prunable_tensors"] == 3


def hand_made(root, step: int, arrays: dict, *, use_ocdbt: bool = False, use_zarr3: bool = False,
              extra_meta: dict | None = None):
    """An Orbax-style step folder written with tensorstore alone (as orbax does with use_ocdbt=False)."""
    folder = root / str(step)
    folder.mkdir(parents=True)
    tree = {}
    for name, value in arrays.items():
        keys = name.split(".")
        tree[str(tuple(keys))] = {"key_metadata": [{"key": k, "key_type": 2} for k in keys],
                                  "value_metadata": {"value_type": "None" if value is None else "np.ndarray",
                                                     "skip_deserialize": value is None}}
        if value is None:
            continue
        shape, dtype = (value if isinstance(value, tuple) else (value.shape, value.dtype))
        spec = {"driver": "zarr3" if use_zarr3 else "zarr",
                "kvstore": {"driver": "file", "path": str(folder / name) + "/"}}
        store = ts.open(spec, create=True, shape=shape, dtype=ts.dtype(np.dtype(dtype).name)).result()
        if not isinstance(value, tuple):
            store.write(value).result()
    meta = {"tree_metadata": tree, "use_ocdbt": use_ocdbt, "use_zarr3": use_zarr3, **(extra_meta or {})}
    (folder / orbax_store.METADATA).write_text(json.dumps(meta))
    return folder


def test_plain_zarr_and_zarr3_layouts_read_by_hand(tmp_path):
    kernel = np.arange(1, 13, dtype=np.float32).reshape(3, 4)
    mask = (kernel % 2 == 0)
    for zarr3 in (False, True):
        root = tmp_path / f"zarr3={zarr3}"
        for step in (10, 20):
            hand_made(root, step, {"params.Dense_0.kernel": kernel, "params.Dense_0.bias": np.ones(4, np.float16),
                                   "opt_state.masks.Dense_0.kernel": mask, "opt_state.masks.Dense_0.bias": None},
                      use_zarr3=zarr3)
        rounds, notes = orbax.OrbaxReader().rounds(root)
        assert [r.index for r in rounds] == [0, 1] and "round = (number - 10) / 10" in notes[-1]
        raw = orbax.OrbaxReader().open_round(rounds[0])
        assert sorted(raw.tensors) == ["Dense_0.bias", "Dense_0.kernel"] and list(raw.masks) == ["Dense_0.kernel"]
        np.testing.assert_array_equal(np.asarray(raw.tensors["Dense_0.kernel"]), kernel)
        np.testing.assert_array_equal(np.asarray(raw.masks["Dense_0.kernel"]), mask)


def test_bfloat16_is_widened(tmp_path):
    import ml_dtypes

    values = np.array([[1.5, -2.0], [0.0, 3.25]], dtype=ml_dtypes.bfloat16)
    folder = hand_made(tmp_path, 0, {"params.w": values, "masks.w": np.ones((2, 2), np.float32)})
    leaf = orbax_store.tree(folder)["params"]["w"]
    assert leaf.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(leaf), values.astype(np.float32))


def test_unfinished_saves_are_skipped(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ORBAX / "closed-form", run)
    shutil.copytree(run / "4", run / "5.orbax-checkpoint-tmp-1700000000")
    opened = orbax.OrbaxReader().open_run(run)
    assert opened.complete_rounds == [0, 1, 2, 3, 4]
    assert opened.unfinished_rounds == [5] and "has not finished this save" in opened.incomplete[5]
    assert "round 5 is incomplete" in opened.completeness_warnings()[0]


def broken_metadata(case: str, folder):
    meta_path = folder / orbax_store.METADATA
    meta = json.loads(meta_path.read_text())
    first = next(iter(meta["tree_metadata"]))
    if case == "not-json":
        meta_path.write_text("{ not json")
        return
    if case == "no-tree":
        meta = {"use_ocdbt": True}
    elif case == "no-keys":
        meta["tree_metadata"][first] = {"value_metadata": {"value_type": "np.ndarray"}}
    elif case == "dotted-key":
        meta["tree_metadata"][first]["key_metadata"][0]["key"] = "a.b"
    elif case == "twice":
        meta["tree_metadata"]["copy"] = meta["tree_metadata"][first]
    elif case == "missing-array":
        meta["tree_metadata"]["gone"] = {"key_metadata": [{"key": "params"}, {"key": "gone"}],
                                         "value_metadata": {"value_type": "np.ndarray"}}
    elif case == "below-leaf":
        keys = meta["tree_metadata"][first]["key_metadata"]
        meta["tree_metadata"]["deeper"] = {"key_metadata": keys + [{"key": "x"}],
                                           "value_metadata": {"value_type": "None"}}
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize("case, expected", [
    ("not-json", "unreadable Orbax metadata"),
    ("no-tree", "no 'tree_metadata' map"),
    ("no-keys", "no key_metadata list"),
    ("dotted-key", "malformed key"),
    ("twice", "listed twice"),
    ("missing-array", "cannot be opened"),
    ("below-leaf", "below a leaf"),
    ("manifest", "cannot be"),
    ("data", "cannot be"),
])
def test_malformed_checkpoints_cost_only_their_run(tmp_path, case, expected):
    root = tmp_path / "archive"
    shutil.copytree(ORBAX / "closed-form", root / "good")
    shutil.copytree(ORBAX / "closed-form", root / "bad")
    step = root / "bad" / "2"
    if case == "manifest":
        (step / "manifest.ocdbt").write_bytes(b"\x00" * 40)
    elif case == "data":
        for f in (step / "d").rglob("*"):
            if f.is_file():
                f.write_bytes(f.read_bytes()[:20])
    else:
        broken_metadata(case, step)
    run_cli("analyze", root, "-o", tmp_path / "out", "-q", expect=1)
    runs = pl.read_parquet(tmp_path / "out" / "runs.parquet")
    assert runs.filter(pl.col("run") == "good")["status"][0] == "ok"
    error = runs.filter(pl.col("run") == "bad")["error"][0]
    assert "bad/2" in error and expected in error, error


def test_huge_declared_shapes_are_refused_before_reading(tmp_path):
    folder = hand_made(tmp_path, 0, {"params.w": ((1 << 30, 1 << 20), np.float32), "masks.w": None})
    with pytest.raises(ScanError, match="needs more memory at once than flowscan's budget"):
        orbax_store.tree(folder)


def test_missing_tensorstore_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorstore", None)
    with pytest.raises(ScanError, match=r"pip install 'flowscan\[orbax\]'"):
        orbax_store.tree(ORBAX / "closed-form" / "0")


@pytest.mark.parametrize("weight_dtype", ["float16", "float32", "float64", "int32"])
@pytest.mark.parametrize("mask_dtype", ["bool", "uint8", "int8", "float32"])
def test_every_dtype_reads_the_same_values(tmp_path, weight_dtype, mask_dtype):
    kernel = np.array([[1.5, -2.0, 0.25], [4.0, -0.5, 3.0]])
    mask = np.array([[1, 0, 1], [0, 1, 1]])
    if weight_dtype == "int32":
        kernel = np.round(kernel * 4)
    hand_made(tmp_path / "run", 0, {"params.w": kernel.astype(weight_dtype), "masks.w": mask.astype(mask_dtype)})
    raw = orbax.OrbaxReader().open_round(orbax.OrbaxReader().rounds(tmp_path / "run")[0][0])
    assert np.array_equal(np.asarray(raw.tensors["w"]).astype(np.float64), kernel)
    assert np.array_equal(np.asarray(raw.masks["w"]).astype(np.int64), mask)
