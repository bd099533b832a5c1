"""File readers against torch/safetensors themselves, and the restricted unpickler's refusals."""

from __future__ import annotations

import builtins
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.utils.prune  # noqa: F401 - not imported by `import torch`
from safetensors.torch import save_file

from flowscan.errors import ScanError, UnsafePickleError
from flowscan.io import npz_file, safetensors_file, torch_file
from flowscan.io.safe_pickle import safe_loads, stub_state

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int8, torch.uint8, torch.bool]


def _sample(dtype):
    return (torch.randn(3, 5) * 4).to(dtype)


def _as_numpy(t):
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


@pytest.mark.parametrize("legacy", [False, True])
def test_torch_files_of_every_dtype_match_torch_load(tmp_path, legacy):
    tensors = {str(d): _sample(d) for d in DTYPES}
    tensors["transposed"] = torch.randn(4, 6).t()          # non-contiguous strides
    tensors["view"] = torch.arange(20.0)[5:15].view(2, 5)  # storage offset
    tensors["empty"] = torch.zeros(0, 3)
    path = tmp_path / "x.pt"
    torch.save({"sd": tensors, "n": 3, "acc": np.float64(0.5)}, path, _use_new_zipfile_serialization=not legacy)
    loaded = torch_file.load(path)
    assert loaded["n"] == 3 and loaded["acc"] == 0.5
    for name, t in tensors.items():
        got = np.asarray(loaded["sd"][name])
        assert got.shape == tuple(t.shape), name
        np.testing.assert_array_equal(got, _as_numpy(t), err_msg=name)


def test_whole_pickled_module_yields_its_state_dict(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    torch.nn.utils.prune.l1_unstructured(model[0], "weight", 0.5)
    torch.save(model, tmp_path / "m.pt")
    state = torch_file.module_state_dict(torch_file.load(tmp_path / "m.pt"))
    assert list(state) == list(model.state_dict())
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(np.asarray(state[k]), v.numpy())


def test_safetensors_reader_matches_safetensors(tmp_path):
    tensors = {str(d): _sample(d) for d in DTYPES}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"round": "2"})
    loaded, meta = safetensors_file.load(tmp_path / "x.safetensors")
    assert meta == {"round": "2"}
    for name, t in tensors.items():
        np.testing.assert_array_equal(np.asarray(loaded[name]), _as_numpy(t))


def test_npz_reader_reads_one_array_at_a_time_and_refuses_object_arrays(tmp_path):
    np.savez(tmp_path / "a.npz", w=np.arange(6.0).reshape(2, 3))
    arrays = npz_file.load(tmp_path / "a.npz")
    assert arrays["w"].shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(arrays["w"]), np.arange(6.0).reshape(2, 3))
    np.savez(tmp_path / "b.npz", o=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ScanError, match="object arrays need pickle"):
        npz_file.load(tmp_path / "b.npz")


class _Call:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


@pytest.mark.parametrize("func", [os.system, builtins.eval, builtins.exec, builtins.getattr, __import__])
def test_unpickler_refuses_any_callable_off_the_allow_list(tmp_path, func):
    marker = tmp_path / "ran"
    payload = pickle.dumps({"x": _Call(func, f"open({str(marker)!r}, 'w')")}, protocol=2)
    with pytest.raises(UnsafePickleError, match=r"evil.pkl: refused as hostile: the pickle names "
                                                r"(posix\.system|builtins\.\w+).*nothing was executed"):
        safe_loads(payload, "evil.pkl")
    assert not marker.exists()


def test_unpickler_stubs_unknown_classes_without_importing_them():
    # GLOBAL 'no_such_package.Thing', EMPTY_TUPLE, NEWOBJ, EMPTY_DICT, 'a', 1, SETITEM, BUILD, STOP
    data = b"\x80\x02cno_such_package\nThing\nq\x00)\x81}X\x01\x00\x00\x00aK\x01sb."
    obj = safe_loads(data)
    assert type(obj).__module__ == "no_such_package" and stub_state(obj) == {"a": 1}
    assert not hasattr(obj, "a")  # pickled state never becomes an attribute


def test_garbage_is_a_clear_error(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(ScanError, match=f"{path}: not a"):
        torch_file.load(path)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ScanError, match="file is empty"):
        torch_file.load(tmp_path / "empty.pth")


class _FakeMapping:
    """A stand-in for a file's memory map that records the pages handed back."""

    def __init__(self, size):
        self.size, self.advised = size, []

    def __len__(self):
        return self.size

    def madvise(self, advice, start, length):
        self.advised.append((start, start + length))


def test_read_storages_are_handed_back_in_batches_of_adjacent_pages(tmp_path, monkeypatch):
    from flowscan.io import arrays

    page = arrays._PAGE
    monkeypatch.setattr(arrays, "RELEASE_BATCH", 8 * page)
    mm = _FakeMapping(64 * page)
    file = arrays.StorageFile(tmp_path / "x.safetensors", mm)
    # weights in pages 0-7, their masks in pages 32-39: read in turn, weight then mask
    for i in range(4):
        file.set_region(f"w{i}", 2 * i * page, 2 * page)
        file.set_region(f"m{i}", (32 + 2 * i) * page, 2 * page)
    for i in range(4):
        file.release(f"w{i}")
        file.release(f"m{i}")
    # two batches of 8 pages, each one call per run of adjacent storages: 4 calls, not 8
    assert mm.advised == [(0, 4 * page), (32 * page, 36 * page), (4 * page, 8 * page), (36 * page, 40 * page)]
    file.release("w0")   # a storage released twice is noted again, harmlessly
    assert len(mm.advised) == 4   # below a batch: nothing handed back yet


def test_a_whole_storage_view_checks_its_shape_and_its_owner(tmp_path):
    from flowscan.io import arrays

    file = arrays.StorageFile(tmp_path / "x.safetensors", _FakeMapping(4096))
    other = arrays.StorageFile(tmp_path / "y.safetensors", _FakeMapping(4096))
    file.set_region("w", 0, 24)
    storage = arrays.Storage(np.dtype(np.float32), 6, file, "w")
    assert arrays.StoredArray.whole(storage, (2, 3), owner=file).stride == (3, 1)
    for shape in ([2, 3], (2, -3), (True, 6), (2.0, 3), (4, 2), (1,) * 32 + (6,)):   # the last: 33 dims
        with pytest.raises(ScanError):
            arrays.StoredArray.whole(storage, shape, owner=file)
    with pytest.raises(ScanError, match="not over a storage of this file"):
        arrays.StoredArray.whole(storage, (6,), owner=other)
