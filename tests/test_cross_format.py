"""One IMP run, every layout: the closed-form run written by torch (prune-style), safetensors,
npz, flowscan's own layout, Flax msgpack, Orbax and Keras (legacy .h5, .keras, Keras-v3), each
by its own library, gives the same per-block tables and sigma_a = 0.5, sigma_b = -1 exactly."""

from __future__ import annotations

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from conftest import FIXTURES, analyze

BLOCKS = ("--blocks", r"^(a|b)[._]")
V3_BLOCKS = ("--blocks", r"a=^prune_low_magnitude\.", "--blocks", r"b=^prune_low_magnitude_[12]\.")
LAYOUTS = {  # fixture -> (block rules, the Python package its reader needs)
    "closed-form/prune-style": (BLOCKS, None), "closed-form/safetensors": (BLOCKS, None),
    "closed-form/npz": (BLOCKS, None), "closed-form/flowscan": (BLOCKS, None),
    "flax/closed-form": (BLOCKS, "msgpack"), "orbax/closed-form": (BLOCKS, "tensorstore"),
    "keras/closed-form-h5": (BLOCKS, "h5py"), "keras/closed-form-keras": (BLOCKS, "h5py"),
    "keras/closed-form-v3": (V3_BLOCKS, "h5py"),
}
COLUMNS = ["round", "block", "n_params", "n_unpruned", "abs_sum", "M", "P", "density", "global_density"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return analyze(FIXTURES / "closed-form" / "safetensors", tmp_path_factory.mktemp("ref"), *BLOCKS)


@pytest.mark.parametrize("fixture", list(LAYOUTS))
def test_every_layout_gives_the_same_tables(tmp_path, reference, fixture):
    blocks, needs = LAYOUTS[fixture]
    if needs:
        pytest.importorskip(needs)
    tables = analyze(FIXTURES / fixture, tmp_path, *blocks)
    assert_frame_equal(tables["rounds"].select(COLUMNS), reference["rounds"].select(COLUMNS),
                       check_exact=False, rel_tol=1e-12, abs_tol=0)
    eigen = tables["eigen"].filter(pl.col("quantity") == "M")
    sigma = dict(zip(eigen["block"], eigen["sigma_mean"]))
    assert abs(sigma["a"] - 0.5) < 1e-9 and abs(sigma["b"] + 1.0) < 1e-9
    for table in ("steps", "survival"):
        assert_frame_equal(tables[table].drop("run"), reference[table].drop("run"), check_exact=False, rel_tol=1e-9)
