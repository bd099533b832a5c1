"""Every object a pickle can build, checked as a class: no allow-listed callable or container takes
attributes from BUILD (a container given `shape`, `dtype` and `__array_interface__` would have numpy
read the memory it points at), only flowscan's own array types are tensors, no constructor turns a
size into bytes, and names that can run code make the file hostile even though nothing calls them."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

import hostile
from hostile import Build, Call, Global, New
from flowscan.errors import ScanError, UnsafePickleError
from flowscan.io import torch_file
from flowscan.io.safe_pickle import Token, base_allowed, is_hostile, safe_loads
from flowscan.readers.names import is_array, is_tensor

_F32 = Call(Global("numpy", "dtype"), "f4", False, True)
# one valid call per allow-listed callable (what a real pickle passes it)
CALLS = {
    ("collections", "OrderedDict"): (),
    ("collections", "defaultdict"): (None,),
    ("builtins", "set"): ([1],),
    ("builtins", "frozenset"): ([1],),
    ("builtins", "slice"): (1, 2),
    ("builtins", "complex"): (1.0, 2.0),
    ("builtins", "bytearray"): (b"ab",),
    ("_codecs", "encode"): ("ab", "latin1"),
    ("copyreg", "_reconstructor"): (Global("evil", "Thing"), Global("builtins", "object"), None),
    ("copyreg", "__newobj__"): (Global("evil", "Thing"),),
    ("copyreg", "__newobj_ex__"): (Global("evil", "Thing"), (), {}),
    ("numpy", "dtype"): ("f4", False, True),
    ("numpy.core.multiarray", "scalar"): (_F32, b"\x00\x00\x80?"),
    ("numpy._core.multiarray", "scalar"): (_F32, b"\x00\x00\x80?"),
    ("numpy.core.multiarray", "_reconstruct"): (Global("numpy", "ndarray"), (0,), b"b"),
    ("numpy._core.multiarray", "_reconstruct"): (Global("numpy", "ndarray"), (0,), b"b"),
    ("numpy.core.numeric", "_frombuffer"): (b"\x00" * 8, _F32, (2,), "C"),
    ("numpy._core.numeric", "_frombuffer"): (b"\x00" * 8, _F32, (2,), "C"),
}
SPOOF = {"shape": (1 << 20,), "dtype": "float32", "ndim": 1,
         "__array_interface__": {"data": (4096, False), "shape": (1 << 20,), "typestr": "<f4", "version": 3}}


def _build_states():
    return {"dict": SPOOF, "slots": (None, SPOOF), "dict+slots": ({}, SPOOF)}


def test_every_allow_listed_callable_has_a_valid_call_here():
    callables = {k for k, v in base_allowed().items() if not isinstance(v, Token)}
    assert callables == set(CALLS), callables ^ set(CALLS)


@pytest.mark.parametrize("state", list(_build_states()))
@pytest.mark.parametrize("key", list(CALLS), ids=".".join)
def test_build_cannot_give_an_allow_listed_object_array_attributes(key, state):
    made = Call(Global(*key), *CALLS[key])
    assert safe_loads(hostile.dumps(made)) is not None   # the call alone is fine
    try:
        obj = safe_loads(hostile.dumps(Build(made, _build_states()[state])))
    except (UnsafePickleError, ScanError):
        return
    # whatever survived (a numpy array's own state), it carries no attribute of the file's
    assert "__array_interface__" not in getattr(obj, "__dict__", {})
    assert not (is_array(obj) and getattr(obj, "shape", None) == (1 << 20,))


@pytest.mark.parametrize("key", [k for k, v in base_allowed().items() if isinstance(v, Token)], ids=".".join)
def test_build_on_an_allow_listed_token_is_refused(key):
    with pytest.raises(UnsafePickleError):
        safe_loads(hostile.dumps(Build(Global(*key), (None, SPOOF))))


def test_an_ordered_dict_keeps_torch_metadata_privately():
    sd = safe_loads(hostile.dumps(Build(Call(Global("collections", "OrderedDict"), [("w", 1)]),
                                        {"_metadata": {"": {"version": 1}}})))
    assert dict(sd) == {"w": 1} and not hasattr(sd, "_metadata")
    with pytest.raises(UnsafePickleError, match="'__array_interface__'"):
        safe_loads(hostile.dumps(Build(Call(Global("collections", "OrderedDict")), SPOOF)))


@pytest.mark.parametrize("value", [
    {"shape": (2,), "dtype": np.dtype("f4")},
    type("Duck", (), {"shape": (2,), "dtype": np.dtype("f4"), "__array_interface__": {}})(),
    np.ma.masked_array([1.0]), np.zeros(2).view(np.recarray),
])
def test_only_flowscans_array_types_are_tensors(value):
    assert not is_array(value) and not is_tensor(value)


@pytest.mark.parametrize("size", [8, 1 << 33, True, 2.0])
@pytest.mark.parametrize("module", ["numpy.core.numeric", "numpy._core.numeric"])
def test_frombuffer_of_a_size_is_refused(size, module):
    with pytest.raises(UnsafePickleError, match="_frombuffer of a"):
        safe_loads(hostile.dumps(Call(Global(module, "_frombuffer"), size, _F32, (2,), "C")))


def test_frombuffer_of_bytes_reads_them():
    got = safe_loads(hostile.dumps(Call(Global("numpy._core.numeric", "_frombuffer"),
                                        np.arange(3, dtype="f4").tobytes(), _F32, (3,), "C")))
    np.testing.assert_array_equal(got, [0, 1, 2])


# -- names that can run code, whether or not anything would call them --------------------------
GADGETS = [("pydoc", "pipepager"), ("uuid", "_get_command_stdout"), ("numpy.ctypeslib", "load_library"),
           ("logging.config", "listen"), ("idlelib.pyshell", "ModifiedInterpreter"), ("lib2to3.main", "main"),
           ("lib2to3.refactor", "RefactoringTool"), ("zipfile", "ZipFile"), ("tarfile", "open"),
           ("shelve", "open"), ("sqlite3", "connect"), ("logging", "FileHandler"), ("timeit", "Timer"),
           ("copyreg", "pickle"), ("math", "sqrt"), ("string", "capwords"), ("_sitebuiltins", "_Helper"),
           ("pathlib", "Path.write_bytes"), ("evil", "Thing.method"), ("torch.fx.graph_module", "reduce_graph_module"),
           ("numpy.lib.format", "read_array"), ("yaml", "unsafe_load"), ("builtins", "print"),
           ("builtins", "map"), ("__builtin__", "apply"), ("torch._ops", "ops")]
DATA = [("datetime", "datetime"), ("datetime", "timedelta"), ("pathlib", "PosixPath"), ("argparse", "Namespace"),
        ("decimal", "Decimal"), ("collections", "deque"), ("builtins", "dict"), ("builtins", "int"),
        ("enum", "Enum"), ("typing", "Any"), ("uuid", "UUID"), ("array", "_array_reconstructor"),
        ("transformers.modeling_bert", "BertModel"), ("lightning.fabric.utilities.data", "AttributeDict"),
        ("numpy.random._pickle", "__randomstate_ctor"), ("omegaconf.dictconfig", "DictConfig"),
        ("mymodel", "Net.Block")]


@pytest.mark.parametrize("module,name", GADGETS)
def test_names_that_can_run_code_are_hostile(tmp_path, module, name):
    assert is_hostile(module, name)
    path = tmp_path / "gadget.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", hostile.dumps({"w": Call(Global(module, name), "x")}))
    named = module.replace("__builtin__", "builtins")   # Python 2 names are read as Python 3's
    with pytest.raises(UnsafePickleError, match=f"names {named}.{name}.*nothing was executed"):
        torch_file.load(path)


@pytest.mark.parametrize("module,name", DATA)
def test_data_types_stay_inert_records(module, name):
    assert not is_hostile(module, name)


# -- zips that do not start at byte 0 ----------------------------------------------------------
@pytest.mark.parametrize("fixture", ["closed-form/prune-style/1checkpoint.pth.tar", "closed-form/npz/round_3.npz",
                                     "keras/closed-form-keras/round_3.keras"])
@pytest.mark.parametrize("prefix", [b"\x00", hostile.dumps(Call(Global("os", "system"), "true")), b"PK\x03\x04" * 8])
def test_a_zip_after_other_bytes_is_a_disguised_file_in_every_reader(tmp_path, fixture, prefix):
    from conftest import FIXTURES
    from flowscan.io import h5_file, npz_file

    source = FIXTURES / fixture
    path = tmp_path / source.name
    path.write_bytes(prefix + source.read_bytes())
    load = {".tar": torch_file.load, ".npz": npz_file.load, ".keras": h5_file.open_weights}[source.suffix]
    with pytest.raises(ScanError, match=f"starts at byte {len(prefix)}.*disguised file") as info:
        load(path)
    assert str(path) in str(info.value)
