"""The Keras reader: fixtures written by tf-keras + TF-MOT themselves (fixtures/make_keras_fixtures.py),
values against the closed form and the same arrays in safetensors, and malformed files built
with h5py. Needs only h5py (no TensorFlow)."""

from __future__ import annotations

import shutil
import sys
import zipfile

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from conftest import FIXTURES, analyze, run_cli
from flowscan.errors import ScanError
from flowscan.readers import keras_h5

h5py = pytest.importorskip("h5py")
KERAS = FIXTURES / "keras"


@pytest.mark.parametrize("layout", ["closed-form-h5", "closed-form-keras", "closed-form-v3"])
def test_kernel_copies_do_not_count_twice_and_biases_carry_no_mask(tmp_path, layout):
    """(The closed-form values of every layout: tests/test_cross_format.py.)"""
    runs = analyze(KERAS / layout, tmp_path, "--blocks", "per-tensor")["runs"].row(0, named=True)
    assert runs["format"] == "keras" and runs["n_prunable_tensors"] == 4
    assert runs["n_prunable_params"] == 3 * 625 + 1875


def test_legacy_names_lose_the_wrapper_and_the_tf_suffix():
    weights, masks = keras_h5.read(KERAS / "closed-form-h5" / "round_1.h5")
    assert sorted(masks) == ["a.0.kernel", "b.0.kernel", "b.1.kernel", "rest.kernel"]
    assert sorted(weights) == sorted([*masks, "a.0.bias"])
    v3_weights, v3_masks = keras_h5.read(KERAS / "closed-form-v3" / "round_1.weights.h5")
    assert sorted(v3_masks) == ["prune_low_magnitude.kernel", "prune_low_magnitude_1.kernel",
                                "prune_low_magnitude_2.kernel", "prune_low_magnitude_3.kernel"]
    # the same arrays under both names (the v3 key order is the model's layer order)
    for legacy, v3 in zip(["a.0", "b.0", "b.1", "rest"], sorted(v3_masks)):
        np.testing.assert_array_equal(np.asarray(weights[f"{legacy}.kernel"]), np.asarray(v3_weights[v3]))
        np.testing.assert_array_equal(np.asarray(masks[f"{legacy}.kernel"]), np.asarray(v3_masks[v3]))


def test_imp_run_reads_nested_masks_over_kernels_that_are_not_pre_masked(tmp_path):
    tables = analyze(KERAS / "imp-mlp", tmp_path)
    runs = tables["runs"].row(0, named=True)
    assert runs["mask_source"] == "stored" and runs["n_prunable_params"] == 64 * 32 + 32 * 16 + 16 * 10
    density = tables["rounds"].group_by("round").agg(pl.col("global_density").first()).sort("round")
    kept = [2720]
    for _ in range(3):
        kept.append(kept[-1] - round(0.2 * kept[-1]))
    assert density["global_density"].to_list() == pytest.approx([k / 2720 for k in kept], abs=1e-12)
    assert tables["survival"]["n_revived"].sum() == 0            # nested: nothing comes back
    # pruned entries hold their (rewound) values: masks could not be inferred from zeros
    weights, masks = keras_h5.read(KERAS / "imp-mlp" / "round_3.keras")
    kernel, mask = np.asarray(weights["fc1.kernel"]), np.asarray(masks["fc1.kernel"])
    assert (mask == 0).any() and np.all(kernel[mask == 0] != 0)


def test_the_same_run_reads_alike_from_legacy_h5_and_keras_zips(tmp_path):
    a = analyze(KERAS / "closed-form-h5", tmp_path / "a", "--blocks", "per-tensor")
    b = analyze(KERAS / "closed-form-keras", tmp_path / "b", "--blocks", "per-tensor")
    assert_frame_equal(a["rounds"].drop("run"), b["rounds"].drop("run"))
    assert_frame_equal(a["eigen"].drop("run"), b["eigen"].drop("run"))


# -- malformed files, built with h5py ------------------------------------------------------------
def legacy_file(path, *, listed=("fc/kernel:0", "fc/bias:0", "prune_low_magnitude_fc/mask:0"),
                mask_shape=(4, 3), extra=None):
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"prune_low_magnitude_fc"]
        g = f.create_group("prune_low_magnitude_fc")
        g.attrs["weight_names"] = [n.encode() for n in listed]
        g.create_dataset("fc/kernel:0", data=np.arange(1, 13, dtype=np.float32).reshape(4, 3))
        g.create_dataset("fc/bias:0", data=np.zeros(3, np.float32))
        g.create_dataset("prune_low_magnitude_fc/mask:0", data=np.ones(mask_shape, np.float32))
        g.create_dataset("prune_low_magnitude_fc/threshold:0", data=np.float32(0))
        if extra:
            extra(f, g)


def analyse_beside_a_good_run(tmp_path, make_bad) -> tuple[str, dict]:
    """A bad run next to a good one: the bad one is a named error, the good one unharmed."""
    root = tmp_path / "archive"
    shutil.copytree(KERAS / "closed-form-h5", root / "good")
    (root / "bad").mkdir()
    make_bad(root / "bad")
    result = run_cli("analyze", root, "-o", tmp_path / "out", "-q", expect=1)
    tables = {t: pl.read_parquet(tmp_path / "out" / f"{t}.parquet") for t in ("runs", "rounds")}
    good = tables["runs"].filter(pl.col("run") == "good").row(0, named=True)
    assert good["status"] == "ok"
    bad = tables["runs"].filter(pl.col("run") == "bad").row(0, named=True)
    assert bad["status"] != "ok" and "bad" in bad["error"]
    return bad["error"], result.output


def test_a_legacy_file_reads_by_hand(tmp_path):
    legacy_file(tmp_path / "round_0.h5")
    weights, masks = keras_h5.read(tmp_path / "round_0.h5")
    assert sorted(weights) == ["fc.bias", "fc.kernel"] and list(masks) == ["fc.kernel"]
    assert np.asarray(weights["fc.kernel"]).sum() == 78


@pytest.mark.parametrize("case, expected", [
    ("not-hdf5", "not a readable HDF5 file"),
    ("truncated", "not a readable HDF5 file"),
    ("listed-not-stored", "is listed but not stored"),
    ("mask-shape", "matches no weight"),
    ("huge", "but stores 0 (a fill value or an expansion beyond 2048:1; refused)"),
    ("keras-no-weights", "without model.weights.h5"),
    ("keras-not-zip", "not a .keras archive"),
    ("empty", "no weights found"),
    ("same-name-h5", "two datasets are named 'fc.kernel'"),
    ("same-name-keras", "two datasets are named 'b.0.kernel'"),
])
def test_malformed_files_cost_only_their_run(tmp_path, case, expected):
    def make(folder):
        target = folder / "round_0.h5"
        if case == "not-hdf5":
            target.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
        elif case == "truncated":
            shutil.copy(KERAS / "closed-form-h5" / "round_1.h5", target)
            target.write_bytes(target.read_bytes()[:5000])
        elif case == "listed-not-stored":
            legacy_file(target, listed=("fc/kernel:0", "fc/gone:0"))
        elif case == "mask-shape":
            legacy_file(target, mask_shape=(2, 2))
        elif case == "huge":
            legacy_file(target, listed=("fc/kernel:0", "big:0"), extra=lambda f, g: g.create_dataset(
                "big:0", shape=(1 << 30, 1 << 20), dtype=np.float32, chunks=(1, 1024)))
        elif case == "keras-no-weights":
            with zipfile.ZipFile(folder / "round_0.keras", "w") as z:
                z.writestr("config.json", "{}")
        elif case == "keras-not-zip":
            (folder / "round_0.keras").write_bytes(b"not a zip at all")
        elif case == "empty":
            with h5py.File(target, "w") as f:
                f.attrs["layer_names"] = []
        elif case == "same-name-h5":   # a second layer group whose weight has the same name
            def twin(f, g):
                f.attrs["layer_names"] = [b"prune_low_magnitude_fc", b"fc_twin"]
                f.create_group("fc_twin").attrs["weight_names"] = [b"fc/kernel:0"]
                f["fc_twin/fc/kernel:0"] = np.ones((4, 3), np.float32)
            legacy_file(target, extra=twin)
        elif case == "same-name-keras":   # a config naming two layers alike
            src = KERAS / "closed-form-keras" / "round_1.keras"
            with zipfile.ZipFile(src) as z_in, zipfile.ZipFile(folder / "round_0.keras", "w") as z_out:
                for info in z_in.infolist():
                    data = z_in.read(info)
                    if info.filename == "config.json":
                        data = data.replace(b'"name": "b.1"', b'"name": "b.0"')
                    z_out.writestr(info, data)
    error, _ = analyse_beside_a_good_run(tmp_path, make)
    assert "round_0." in error and expected in error, error


def test_compressed_keras_members_and_non_numeric_datasets_are_read(tmp_path):
    src = KERAS / "closed-form-keras" / "round_2.keras"
    with zipfile.ZipFile(src) as z_in, zipfile.ZipFile(tmp_path / "round_2.keras", "w",
                                                       zipfile.ZIP_DEFLATED) as z_out:
        for info in z_in.infolist():
            z_out.writestr(info.filename, z_in.read(info))
    a = keras_h5.read(src)
    b = keras_h5.read(tmp_path / "round_2.keras")
    for name in a[0]:
        np.testing.assert_array_equal(np.asarray(a[0][name]), np.asarray(b[0][name]))
    legacy_file(tmp_path / "round_0.h5", listed=("fc/kernel:0", "prune_low_magnitude_fc/mask:0", "note:0"),
                extra=lambda f, g: g.create_dataset("note:0", data=b"text"))
    weights, _ = keras_h5.read(tmp_path / "round_0.h5")
    assert list(weights) == ["fc.kernel"]


def test_v3_optimizer_and_metric_variables_are_not_weights(tmp_path):
    path = tmp_path / "round_0.weights.h5"
    shutil.copy(KERAS / "closed-form-v3" / "round_1.weights.h5", path)
    with h5py.File(path, "a") as f:
        f.create_dataset("optimizer/vars/1", data=np.ones((25, 25)))
        f.create_dataset("metrics/mean/vars/0", data=np.float32(1))
    weights, masks = keras_h5.read(path)
    assert all(name.startswith("prune_low_magnitude") for name in weights) and len(masks) == 4


def test_missing_h5py_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ScanError, match=r"pip install 'flowscan\[keras\]'"):
        keras_h5.read(KERAS / "closed-form-h5" / "round_0.h5")


def test_keras_resnet_names_get_the_keras_presets():
    from flowscan.blocks import PRESETS, detect_preset

    names = ["conv1_conv.kernel", "conv2_block1_0_conv.kernel", "conv2_block2_1_conv.kernel",
             "conv4_block6_3_conv.kernel", "predictions.kernel"]
    assert detect_preset(names).name == "keras-resnet-stages"
    assert PRESETS["keras-resnet-stages"].labels(names) == ["stem", "conv2", "conv2", "conv4", "fc"]
    assert PRESETS["keras-resnet-blocks"].labels(names) == ["stem", "conv2_block1", "conv2_block2",
                                                            "conv4_block6", "fc"]


def test_flax_resnet_names_get_stages_from_the_standard_depths():
    from flowscan.blocks import PRESETS, detect_preset

    names = ["conv_init.kernel"] + [f"BottleneckResNetBlock_{i}.Conv_0.kernel" for i in range(16)] + ["Dense_0.kernel"]
    assert detect_preset(names).name == "flax-resnet-stages"
    stages = PRESETS["flax-resnet-stages"].labels(names)
    # ResNet-50: 3, 4, 6, 3 blocks per stage
    assert stages == ["stem"] + ["stage1"] * 3 + ["stage2"] * 4 + ["stage3"] * 6 + ["stage4"] * 3 + ["fc"]
    # an unknown depth: no stage is guessed
    assert PRESETS["flax-resnet-stages"].labels(names[:6])[1:] == [None] * 5


@pytest.mark.parametrize("weight_dtype", ["float16", "float32", "float64", ">f4"])
@pytest.mark.parametrize("mask_dtype", ["bool", "uint8", "int8", "float32"])
def test_every_dtype_reads_the_same_values(tmp_path, weight_dtype, mask_dtype):
    kernel = np.array([[1.5, -2.0, 0.25], [4.0, -0.5, 3.0]])
    mask = np.array([[1, 0, 1], [0, 1, 1]])
    with h5py.File(tmp_path / "round_0.h5", "w") as f:
        f.attrs["layer_names"] = [b"prune_low_magnitude_fc"]
        g = f.create_group("prune_low_magnitude_fc")
        g.attrs["weight_names"] = [b"fc/kernel:0", b"prune_low_magnitude_fc/mask:0"]
        g.create_dataset("fc/kernel:0", data=kernel.astype(weight_dtype))
        g.create_dataset("prune_low_magnitude_fc/mask:0", data=mask.astype(mask_dtype))
    weights, masks = keras_h5.read(tmp_path / "round_0.h5")
    got = np.asarray(weights["fc.kernel"])
    assert got.dtype.isnative and np.array_equal(got.astype(np.float64), kernel)
    assert np.array_equal(np.asarray(masks["fc.kernel"]).astype(np.int64), mask)
    tables = analyze(tmp_path, tmp_path / "out")
    rounds = tables["rounds"].row(0, named=True)
    assert rounds["n_unpruned"] == 4 and rounds["abs_sum"] == pytest.approx(1.5 + 0.25 + 0.5 + 3.0)


def test_full_model_files_and_nested_v3_models(tmp_path):
    """model.save('x.h5') keeps the weights under model_weights/; a v3 file nests a sub-model's
    layers under its own layers/ group."""
    legacy_file(tmp_path / "a.h5")
    with h5py.File(tmp_path / "a.h5") as src, h5py.File(tmp_path / "round_0.h5", "w") as dst:
        src.copy(src["prune_low_magnitude_fc"], dst, name="model_weights/prune_low_magnitude_fc")
        dst["model_weights"].attrs["layer_names"] = [b"prune_low_magnitude_fc"]
        dst.attrs["model_config"] = "{}"
    weights, masks = keras_h5.read(tmp_path / "round_0.h5")
    assert sorted(weights) == ["fc.bias", "fc.kernel"] and list(masks) == ["fc.kernel"]

    with h5py.File(tmp_path / "round_1.weights.h5", "w") as f:
        inner = f.create_group("layers/functional/layers/prune_low_magnitude")
        inner["layer/vars/0"] = np.ones((3, 2), np.float32)
        inner["layer/vars/1"] = np.zeros(2, np.float32)
        inner["vars/0"] = np.ones((3, 2), np.float32)          # the wrapper's copy of the kernel
        inner["vars/1"] = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
        inner["vars/2"] = np.float32(0.1)
        inner["vars/3"] = np.int64(7)
        f["layers/dense/vars/0"] = np.ones((2, 2), np.float32)  # an unwrapped layer: no mask
    weights, masks = keras_h5.read(tmp_path / "round_1.weights.h5")
    assert sorted(weights) == ["dense.vars.0", "functional.prune_low_magnitude.bias",
                               "functional.prune_low_magnitude.kernel"]
    assert list(masks) == ["functional.prune_low_magnitude.kernel"]
    assert np.asarray(masks["functional.prune_low_magnitude.kernel"]).sum() == 4
