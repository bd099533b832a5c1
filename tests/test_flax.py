"""The Flax msgpack reader: fixtures written by flax itself (fixtures/make_flax_fixtures.py),
values against the closed form and against the same arrays in another layout, and every kind
of malformed field. Needs only msgpack (no jax)."""

from __future__ import annotations

import math
import shutil

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal
from safetensors.numpy import save_file

from conftest import FIXTURES, analyze
from flowscan.errors import ScanError
from flowscan.io import msgpack_file
from flowscan.readers import flax_msgpack

msgpack = pytest.importorskip("msgpack")
FLAX = FIXTURES / "flax"


def test_closed_form_run_gives_the_exact_sigmas(tmp_path):
    tables = analyze(FLAX / "closed-form", tmp_path, "--blocks", r"^(a|b)\.")
    eigen = tables["eigen"].filter(pl.col("quantity") == "M")
    sigma = dict(zip(eigen["block"], eigen["sigma_mean"]))
    assert sigma["a"] == pytest.approx(0.5, abs=1e-9) and sigma["b"] == pytest.approx(-1.0, abs=1e-9)
    same = analyze(FIXTURES / "closed-form" / "safetensors", tmp_path / "st", "--blocks", r"^(a|b)\.")
    cols = ["round", "block", "n_params", "n_unpruned", "abs_sum", "M", "P"]
    assert_frame_equal(tables["rounds"].select(cols), same["rounds"].select(cols), check_exact=False, rel_tol=1e-12)


def test_imp_run_takes_masks_from_the_optimizer_state_not_adams_moments(tmp_path):
    run = FLAX / "imp-mlp"
    tables = analyze(run, tmp_path)
    runs = tables["runs"].row(0, named=True)
    assert runs["format"] == "flax" and runs["mask_source"] == "stored" and runs["n_prunable_tensors"] == 3
    density = tables["rounds"].group_by("round").agg(pl.col("global_density").first()).sort("round")
    assert density["global_density"].to_list() == pytest.approx([1.0, 0.8, 0.64, 0.512], abs=2e-3)
    tree = msgpack_file.load(run / "checkpoint_600")
    mask = tree["opt_state"]["masks"]["kernel_0"]
    kernel = tree["params"]["kernel_0"]
    assert mask.dtype == bool and tree["opt_state"]["masks"]["bias_0"] is None
    assert np.count_nonzero(kernel[~mask]) == np.count_nonzero(~mask)   # stored without the mask applied
    mu = tree["opt_state"]["inner_state"]["0"]["mu"]["kernel_0"]
    assert mu.shape == mask.shape                                       # a parallel tree that is no mask
    assert "round = (number - 150) / 150 of the numbered files" in runs["notes"]


def test_tables_equal_the_same_arrays_in_safetensors(tmp_path):
    """The IMP run's weights and masks re-written as safetensors give the same tables."""
    st = tmp_path / "st"
    st.mkdir()
    for n, path in enumerate(sorted((FLAX / "imp-mlp").iterdir(), key=lambda p: int(p.name.split("_")[1]))):
        weights, masks = flax_msgpack.split(msgpack_file.load(path), path)
        save_file({**{k: np.ascontiguousarray(v) for k, v in weights.items()},
                   **{f"{k}_mask": m.astype(np.uint8) for k, m in masks.items()}}, str(st / f"round_{n}.safetensors"))
    a, b = analyze(FLAX / "imp-mlp", tmp_path / "a"), analyze(st, tmp_path / "b")
    for name in ("rounds", "steps", "eigen", "survival"):
        assert_frame_equal(a[name].drop("run"), b[name].drop("run"), check_exact=True)


def _pack(tree) -> bytes:
    return msgpack.packb(tree, use_bin_type=True)


def _array(arr: np.ndarray, dtype_name: str | None = None, shape=None, data: bytes | None = None) -> msgpack.ExtType:
    fields = [list(arr.shape if shape is None else shape), (dtype_name or arr.dtype.name).encode(),
              arr.tobytes() if data is None else data]
    return msgpack.ExtType(1, _pack(fields))


def _write(tmp_path, tree, name="round_0.msgpack"):
    path = tmp_path / name
    path.write_bytes(_pack(tree) if not isinstance(tree, bytes) else tree)
    return path


def test_bfloat16_and_chunked_arrays_are_read_exactly(tmp_path):
    values = np.array([1.5, -2.25, 2.0 ** 127, 0.0], dtype=np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)   # exactly representable values
    big = np.arange(12, dtype=np.float32)
    chunked = {"__msgpack_chunked_array__": True, "shape": {"0": 3, "1": 4},
               "chunks": {"0": _array(big[:5]), "1": _array(big[5:])}}
    tree = {"params": {"w": _array(bf16, "bfloat16"), "c": chunked}}
    out = msgpack_file.load(_write(tmp_path, tree))
    np.testing.assert_array_equal(out["params"]["w"], values)
    np.testing.assert_array_equal(out["params"]["c"], big.reshape(3, 4))


MALFORMED = {
    "top level not a map": ([1, 2], "top level is not a map"),
    "no params": ({"weights": {"w": None}}, "no 'params' tree"),
    "params without arrays": ({"params": {"w": 3}}, "holds no arrays"),
    "unknown extension": ({"params": {"w": msgpack.ExtType(9, b"x")}}, "unknown msgpack extension type 9"),
    "object dtype": ({"params": {"w": _array(np.zeros(2), "object", data=b"x" * 16)}}, "unsupported dtype 'object'"),
    "short data": ({"params": {"w": _array(np.zeros(4, np.float32), data=b"\0" * 15)}}, "needs 16 bytes, has 15"),
    "negative shape": ({"params": {"w": _array(np.zeros(0, np.float32), shape=[-1])}}, "invalid shape"),
    "huge shape": ({"params": {"w": _array(np.zeros(0, np.float32), shape=[2**40, 2**40])}}, "needs"),
    "fields not a triple": ({"params": {"w": msgpack.ExtType(1, _pack([1, 2]))}}, "not [shape, dtype, bytes]"),
    "chunks missing": ({"params": {"w": {"__msgpack_chunked_array__": True, "shape": {"0": 4},
                                         "chunks": {"1": _array(np.zeros(4))}}}}, "numbered 0..n-1"),
    "chunks too few": ({"params": {"w": {"__msgpack_chunked_array__": True, "shape": {"0": 5},
                                         "chunks": {"0": _array(np.zeros(4))}}}}, "hold 4 values"),
    "two mask trees": ({"params": {"w": _array(np.ones((2, 2), np.float32))},
                        "masks": {"w": _array(np.ones((2, 2), bool))},
                        "opt_state": {"mask": {"w": _array(np.ones((2, 2), bool))}}}, "two mask trees"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_files_are_named_errors_and_cost_only_their_run(tmp_path, case):
    tree, message = MALFORMED[case]
    bad = tmp_path / "archive" / "bad"
    bad.mkdir(parents=True)
    path = _write(bad, tree)
    shutil.copytree(FLAX / "imp-mlp", tmp_path / "archive" / "good")
    with pytest.raises(ScanError) as err:
        flax_msgpack.split(msgpack_file.load(path), path)
    assert message in str(err.value) and str(path) in str(err.value)
    tables = analyze(tmp_path / "archive", tmp_path / "out", expect=1)
    status = dict(zip(tables["runs"]["run"], tables["runs"]["status"]))
    assert status == {"bad": "error", "good": "ok"}


@pytest.mark.parametrize("data", [b"", b"\x81", b"\xc1", b"\x91" * 100_000 + b"\x00", b"\x85\xa1a"])
def test_broken_msgpack_bytes_are_named(tmp_path, data):
    path = _write(tmp_path, data)
    with pytest.raises(ScanError) as err:
        flax_msgpack.split(msgpack_file.load(path), path)
    assert str(path) in str(err.value)


def test_masks_of_a_variables_dict_and_none_leaves(tmp_path):
    w = np.arange(6, dtype=np.float32).reshape(2, 3) + 1
    m = np.array([[1, 0, 1], [0, 1, 1]], np.float32)
    tree = {"params": {"params": {"Dense_0": {"kernel": _array(w), "bias": _array(np.ones(3, np.float32))}}},
            "masks": {"params": {"Dense_0": {"kernel": _array(m), "bias": None}}}}
    weights, masks = flax_msgpack.split(msgpack_file.load(_write(tmp_path, tree)), tmp_path)
    assert set(weights) == {"Dense_0.kernel", "Dense_0.bias"} and set(masks) == {"Dense_0.kernel"}
    np.testing.assert_array_equal(masks["Dense_0.kernel"], m)


def test_without_msgpack_the_error_says_what_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "msgpack", None)   # import msgpack now raises ImportError
    with pytest.raises(ScanError, match=r"pip install 'flowscan\[flax\]'"):
        msgpack_file.load(FLAX / "imp-mlp" / "checkpoint_150")


def test_file_size_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(msgpack_file, "MAX_FILE_BYTES", 100)
    with pytest.raises(ScanError, match="larger than flowscan reads whole"):
        msgpack_file.load(FLAX / "imp-mlp" / "checkpoint_150")
    assert math.isfinite(msgpack_file.MAX_FILE_BYTES)
