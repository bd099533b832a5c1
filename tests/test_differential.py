"""flowscan's readers against the libraries that wrote the files: torch.load, safetensors, numpy.

Every dtype torch writes is read exactly or refused with its name; views, 0-d, empty, shared
and expanded storages; whole pickled modules give exactly `state_dict()` (persistent buffers
only); Lightning-style checkpoints whose hyper-parameters hold pathlib, datetime, enum and
argparse values load, with those values kept as inert records and listed.
"""

from __future__ import annotations

import argparse
import datetime
import enum
import pathlib

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as st_load, save_file as st_save

from flowscan.errors import ScanError
from flowscan.io import npz_file, safetensors_file, torch_file
from flowscan.readers.base import NameOptions, RawRound
from flowscan.readers.names import pair
from flowscan.readers.torch_round import open_torch_round

EXACT = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int16,
         torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.bool,
         torch.complex64, torch.complex128]
REFUSED = [torch.float8_e4m3fn, torch.float8_e5m2, torch.complex32]


def _numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.float().numpy()
    if t.dtype in (torch.uint16, torch.uint32, torch.uint64):
        return t.to(torch.int64).numpy().astype({torch.uint16: np.uint16, torch.uint32: np.uint32,
                                                 torch.uint64: np.uint64}[t.dtype])
    return t.numpy()


def _family(dtype) -> dict[str, torch.Tensor]:
    base = (torch.arange(24) - 12).reshape(4, 6)
    if dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64):
        base = base.abs()
    if dtype.is_floating_point:
        base = base * 0.37
    t = base.to(dtype)
    shared = t.flatten()
    return {"plain": t, "zero_d": t[1, 2].clone(), "empty": t[:0], "transposed": t.t(),
            "offset_view": shared[5:17].view(3, 4), "also_shared": shared[2:8],
            "expanded": t[0].clone().expand(3, 6), "min": torch.tensor(_extreme(dtype), dtype=dtype)}


def _extreme(dtype):
    if dtype == torch.bool:
        return True
    if dtype.is_complex:
        return complex(-1.5, 2.5)
    if dtype.is_floating_point:
        return float(torch.finfo(dtype).min)
    return int(torch.iinfo(dtype).min)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("dtype", EXACT, ids=str)
def test_every_dtype_matches_torch_load(tmp_path, dtype, legacy):
    tensors = _family(dtype)
    path = tmp_path / "x.pt"
    try:
        torch.save(tensors, path, _use_new_zipfile_serialization=not legacy)
        expected = torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch's legacy format lacks the newest dtypes
        pytest.skip(f"torch itself cannot round-trip {dtype} in this format: {type(exc).__name__}")
    got = torch_file.load(path)
    for name, t in expected.items():
        array = np.asarray(got[name])
        assert array.shape == tuple(t.shape), name
        np.testing.assert_array_equal(array, _numpy(t), err_msg=f"{dtype} {name}")


@pytest.mark.parametrize("dtype", REFUSED, ids=str)
def test_dtypes_without_a_numpy_form_are_refused_by_name(tmp_path, dtype):
    torch.save({"w": torch.zeros(3, 3).to(dtype)}, tmp_path / "x.pt")
    with pytest.raises(ScanError, match=rf"tensor 'w'.*{str(dtype)}"):
        pair(open_torch_round(tmp_path / "x.pt"), NameOptions())


def test_quantized_tensors_are_refused_by_name(tmp_path):
    q = torch.quantize_per_tensor(torch.zeros(3), 0.1, 0, torch.qint8)
    torch.save({"w": q}, tmp_path / "x.pt")
    with pytest.raises(ScanError, match="tensor 'w'.*quantized tensors are not supported"):
        pair(open_torch_round(tmp_path / "x.pt"), NameOptions())


class _WithBuffers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        self.register_buffer("kept", torch.arange(3.0))
        self.register_buffer("scratch", torch.ones(2), persistent=False)
        self.body[0].register_buffer("cache", torch.zeros(5), persistent=False)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_whole_module_gives_exactly_its_state_dict(tmp_path, legacy):
    model = _WithBuffers()
    torch.save(model, tmp_path / "m.pt", _use_new_zipfile_serialization=not legacy)
    got = torch_file.module_state_dict(torch_file.load(tmp_path / "m.pt"))
    expected = model.state_dict()
    assert list(got) == list(expected)
    for name, t in expected.items():
        np.testing.assert_array_equal(np.asarray(got[name]), t.numpy(), err_msg=name)


class _Stage(enum.Enum):
    TRAIN = "train"


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_lightning_style_hyper_parameters_load_as_inert_records(tmp_path, protocol):
    weights = {"layer.weight": torch.randn(3, 4), "layer.weight_mask": (torch.rand(3, 4) > 0.5).float()}
    hparams = {"data_dir": pathlib.PurePosixPath("/data/cifar"), "started": datetime.datetime(2024, 5, 1, 12),
               "stage": _Stage.TRAIN, "args": argparse.Namespace(lr=0.1, depth=20),
               "complex": complex(1, 2), "slices": slice(1, 5), "frozen": frozenset({1, 2}),
               "blob": bytearray(b"xyz"), "array": np.arange(4.0)}
    path = tmp_path / "epoch=3.ckpt"
    torch.save({"state_dict": weights, "hyper_parameters": hparams, "epoch": 3}, path,
               pickle_protocol=protocol)
    raw = open_torch_round(path)
    assert any("not executed" in n and "datetime.datetime" in n and "_Stage" in n for n in raw.notes), raw.notes
    loaded = torch_file.load(path)
    hp = loaded["hyper_parameters"]
    assert hp["complex"] == complex(1, 2) and hp["slices"] == slice(1, 5) and hp["frozen"] == frozenset({1, 2})
    assert hp["blob"] == bytearray(b"xyz")
    np.testing.assert_array_equal(hp["array"], np.arange(4.0))   # numpy's protocol-5 _frombuffer too
    refs = {r.name: r for r in pair(raw, NameOptions())}
    np.testing.assert_array_equal(np.asarray(refs["layer.weight"].weight), weights["layer.weight"].numpy())
    np.testing.assert_array_equal(np.asarray(refs["layer.weight"].mask), weights["layer.weight_mask"].numpy())


def test_safetensors_match_the_safetensors_library(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"f64": rng.normal(size=(3, 4)), "f32": rng.normal(size=(5,)).astype(np.float32),
               "f16": rng.normal(size=(2, 2)).astype(np.float16), "i8": np.array([-128, 0, 127], np.int8),
               "u16": np.array([0, 65535], np.uint16), "u64": np.array([2**64 - 1], np.uint64),
               "b": np.array([True, False]), "zero_d": np.array(3.5, np.float32),
               "empty": np.zeros((0, 4), np.float32)}
    st_save(tensors, str(tmp_path / "x.safetensors"))
    expected = st_load(str(tmp_path / "x.safetensors"))
    got, _meta = safetensors_file.load(tmp_path / "x.safetensors")
    assert set(got) == set(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(np.asarray(got[name]), array, err_msg=name)
        assert np.asarray(got[name]).dtype == array.dtype


@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "deflated"])
def test_npz_matches_numpy(tmp_path, compressed):
    arrays = {"c": np.arange(12.0).reshape(3, 4), "f": np.asfortranarray(np.arange(12).reshape(3, 4)),
              "big_endian": np.arange(5, dtype=">f4"), "zero_d": np.array(7, np.int16),
              "empty": np.zeros((0, 2)), "i8": np.array([-128, 5], np.int8)}
    (np.savez_compressed if compressed else np.savez)(tmp_path / "a.npz", **arrays)
    got = npz_file.load(tmp_path / "a.npz")
    with np.load(tmp_path / "a.npz") as expected:
        assert set(got) == set(expected.files)
        for name in expected.files:
            np.testing.assert_array_equal(np.asarray(got[name]), expected[name], err_msg=name)


def test_int_min_weights_have_their_true_magnitude(tmp_path):
    from flowscan.reduce import reduce_tensor
    from flowscan.readers.base import TensorRef

    for dtype in (np.int8, np.int16, np.int32, np.int64):
        w = np.array([[np.iinfo(dtype).min, 1], [0, -2]], dtype)
        sums, _bits = reduce_tensor(TensorRef("w", w, None, tmp_path))
        assert sums.abs_sum == float(-int(np.iinfo(dtype).min)) + 3.0, dtype


def test_names_with_unreadable_values_outside_the_state_dict_are_ignored(tmp_path):
    # a quantized tensor in the optimizer state does not stop the weights from being read
    q = torch.quantize_per_tensor(torch.zeros(3), 0.1, 0, torch.qint8)
    torch.save({"state_dict": {"w": torch.ones(2, 2)}, "optimizer": {"q": q}}, tmp_path / "x.pt")
    refs = pair(open_torch_round(tmp_path / "x.pt"), NameOptions())
    assert [r.name for r in refs] == ["w"]
    assert isinstance(open_torch_round(tmp_path / "x.pt"), RawRound)
