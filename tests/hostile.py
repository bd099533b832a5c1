"""Hostile checkpoints, written from source by this script (no binary blobs in the repository).

`PAYLOADS` maps a payload kind to a function that returns the object to plant: a tree of
ordinary values and the builders below (`Global`, `Call`, `New`, `Build`, `Raw`, `Persist`),
which `Writer` turns into pickle opcodes exactly as written, whatever Python's own pickler would
allow. `plant()` writes one payload into each container flowscan reads pickles from: a torch
zip checkpoint, a legacy (pre-1.6) torch file, a BERT-Tickets whole pickled module and a
BERT-Tickets `result.pt`. Every payload must make its file fail with a named error, run nothing
(the canary file stays absent) and leave every other run's results unchanged.

    python tests/hostile.py OUT     writes the corpus beside a good run, for a manual look
"""

from __future__ import annotations

import io
import pickle
import shutil
import struct
import sys
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


# -- a pickle writer that writes what it is told ---------------------------------------------
class Global:
    def __init__(self, module: str, name: str, opcode: str = "GLOBAL"):
        self.module, self.name, self.opcode = module, name, opcode


class Call:
    """REDUCE: func(*args)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args


class New:
    """NEWOBJ (or NEWOBJ_EX with kwargs): cls.__new__(cls, *args)."""

    def __init__(self, cls, *args, kwargs=None):
        self.cls, self.args, self.kwargs = cls, args, kwargs


class Build:
    """BUILD: obj.__setstate__(state), or its __dict__/slots updated."""

    def __init__(self, obj, state):
        self.obj, self.state = obj, state


class Raw:
    """Opcodes as given; they must leave exactly one object on the stack."""

    def __init__(self, data: bytes):
        self.data = data


class MemoGlobal:
    """STACK_GLOBAL whose module and name come from the memo (BINGET), not from the stream beside it."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name


class Persist:
    """BINPERSID with this persistent id."""

    def __init__(self, pid):
        self.pid = pid


class Writer(pickle._Pickler):
    dispatch = pickle._Pickler.dispatch.copy()

    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, Persist) else None

    def save_global_ref(self, obj):
        if obj.opcode == "STACK_GLOBAL":
            self.save(obj.module)
            self.save(obj.name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    def save_call(self, obj):
        self.save(obj.func)
        self.save(tuple(obj.args))
        self.write(pickle.REDUCE)

    def save_new(self, obj):
        self.save(obj.cls)
        self.save(tuple(obj.args))
        if obj.kwargs is not None:
            self.save(dict(obj.kwargs))
            self.write(pickle.NEWOBJ_EX)
        else:
            self.write(pickle.NEWOBJ)

    def save_build(self, obj):
        self.save(obj.obj)
        self.save(obj.state)
        self.write(pickle.BUILD)

    def save_raw(self, obj):
        self.write(obj.data)

    def save_memo_global(self, obj):
        for text in (obj.module, obj.name):   # each string memoized, then popped off the stack
            self.save(text)
            self.write(pickle.POP)
        for text in (obj.module, obj.name):
            self.write(self.get(self.memo[id(text)][0]))
        self.write(pickle.STACK_GLOBAL)

    dispatch[Global] = save_global_ref
    dispatch[Call] = save_call
    dispatch[New] = save_new
    dispatch[Build] = save_build
    dispatch[Raw] = save_raw
    dispatch[MemoGlobal] = save_memo_global


def dumps(obj, protocol: int = 2) -> bytes:
    buf = io.BytesIO()
    Writer(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


# -- tensors as torch.save writes them -------------------------------------------------------
_STORAGE = {np.dtype(np.float64): "DoubleStorage", np.dtype(np.float32): "FloatStorage",
            np.dtype(np.uint8): "ByteStorage", np.dtype(np.int64): "LongStorage"}


class Tensors:
    """Storages of one file being written: `tensor()` adds one and returns its rebuild call."""

    def __init__(self, legacy: bool = False):
        self.legacy, self.storages = legacy, {}

    def storage(self, data: bytes, numel: int, kind: str = "FloatStorage", key: str | None = None):
        key = key or str(len(self.storages))
        self.storages.setdefault(key, (numel, data))
        pid = ("storage", Global("torch", kind), key, "cpu", numel)
        return Persist(pid + (None,) if self.legacy else pid)

    def tensor(self, array: np.ndarray):
        array = np.ascontiguousarray(array)
        storage = self.storage(array.tobytes(), array.size, _STORAGE[array.dtype])
        return rebuild(storage, 0, array.shape, _strides(array.shape))


_REBUILD_V2 = Global("torch._utils", "_rebuild_tensor_v2")
_ORDERED_DICT = Global("collections", "OrderedDict")


def rebuild(storage, offset, shape, stride):
    shape = shape if isinstance(shape, tuple) else tuple(shape)
    stride = stride if isinstance(stride, tuple) else tuple(stride)
    return Call(_REBUILD_V2, storage, offset, shape, stride, False, Call(_ORDERED_DICT))


def _strides(shape):
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(out))


def write_zip(path: Path, data_pkl: bytes, storages: dict, compress_pkl: bool = False,
              extra: list[tuple[str, bytes, int]] = ()) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data_pkl,
                    compress_type=zipfile.ZIP_DEFLATED if compress_pkl else zipfile.ZIP_STORED)
        for key, (_numel, data) in storages.items():
            zf.writestr(f"archive/data/{key}", data)
        zf.writestr("archive/version", b"3\n")
        for name, data, compress in extra:
            zf.writestr(name, data, compress_type=compress)


def write_legacy(path: Path, obj_pkl: bytes, storages: dict) -> None:
    with open(path, "wb") as f:
        f.write(pickle.dumps(LEGACY_MAGIC, protocol=2))
        f.write(pickle.dumps(1001, protocol=2))
        f.write(pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2))
        f.write(obj_pkl)
        f.write(pickle.dumps(list(storages), protocol=2))
        for _key, (numel, data) in storages.items():
            f.write(struct.pack("<q", numel if isinstance(numel, int) else len(data)))
            f.write(data)


# -- payloads -------------------------------------------------------------------------------
def _canary_call(module: str, name: str, canary: Path, opcode: str = "GLOBAL"):
    return Call(Global(module, name, opcode), f"touch {canary}")


def _spoof(state: dict):
    """An unknown class whose pickled state claims to be an array."""
    return Build(New(Global("evil", "FakeStorage")), state)


def _spoof_container(interface: dict):
    """An allow-listed container whose BUILD state claims to be an array."""
    return Build(Call(_ORDERED_DICT), {"shape": interface["shape"], "dtype": "float32",
                                       "__array_interface__": interface})


def _raw_deep(levels: int) -> Raw:
    return Raw(b"]" * levels + b"a" * (levels - 1))   # EMPTY_LIST x n, APPEND x (n-1)


def _many_tensors(storage, n: int) -> list:
    shape = (1,)
    return [rebuild(storage, 0, shape, shape) for _ in range(n)]


def payloads(canary: Path, t: Tensors) -> dict[str, object]:
    """Payload kind -> builder of the object to plant in place of a weight (refused when read);
    builders register only the storages they use."""
    c = canary
    def small():
        return t.storage(np.zeros(16, np.float32).tobytes(), 16, key="small")

    out = {
        # code execution families: refused as hostile, naming the global
        "os.system": lambda: _canary_call("os", "system", c),
        "posix.system": lambda: _canary_call("posix", "system", c),
        "nt.system": lambda: _canary_call("nt", "system", c),
        "subprocess.Popen": lambda: Call(Global("subprocess", "Popen"), ["touch", str(c)]),
        "subprocess.check_output": lambda: Call(Global("subprocess", "check_output"), ["touch", str(c)]),
        "builtins.eval": lambda: Call(Global("builtins", "eval"), f"open({str(c)!r}, 'w')"),
        "builtins.exec": lambda: Call(Global("builtins", "exec"), f"open({str(c)!r}, 'w')"),
        "builtins.compile": lambda: Call(Global("builtins", "compile"), "1", "x", "eval"),
        "builtins.__import__": lambda: Call(Global("builtins", "__import__"), "os"),
        "builtins.getattr": lambda: Call(Global("builtins", "getattr"), Global("os", "path"), "join"),
        "builtins.open": lambda: Call(Global("builtins", "open"), str(c), "w"),
        "__builtin__.eval (protocol-2 name)": lambda: Call(Global("__builtin__", "eval"), f"open({str(c)!r}, 'w')"),
        "importlib.import_module": lambda: Call(Global("importlib", "import_module"), "os"),
        "runpy._run_code": lambda: Call(Global("runpy", "_run_code"), "import os", {}),
        "pickle.loads": lambda: Call(Global("pickle", "loads"), pickle.dumps(1)),
        "_pickle.loads": lambda: Call(Global("_pickle", "loads"), pickle.dumps(1)),
        "marshal.loads": lambda: Call(Global("marshal", "loads"), b"\xe9\x00"),
        "ctypes.CDLL": lambda: Call(Global("ctypes", "CDLL"), "libc.so.6"),
        "socket.create_connection": lambda: Call(Global("socket", "create_connection"), ("127.0.0.1", 9)),
        "shutil.rmtree": lambda: Call(Global("shutil", "rmtree"), str(c.parent / "nothing")),
        "sys.modules": lambda: Global("sys", "modules"),
        "operator.attrgetter": lambda: Call(Global("operator", "attrgetter"), "system"),
        "operator.methodcaller": lambda: Call(Global("operator", "methodcaller"), "system", "true"),
        "functools.partial": lambda: Call(Global("functools", "partial"), Global("os", "system"), "true"),
        "torch.hub.load": lambda: Call(Global("torch.hub", "load"), "x/y", "z"),
        "torch.load": lambda: Call(Global("torch", "load"), str(c)),
        "numpy.testing runstring": lambda: Call(Global("numpy.testing._private.utils", "runstring"),
                                        f"open({str(c)!r}, 'w')", {}),
        "webbrowser.open": lambda: Call(Global("webbrowser", "open"), "http://127.0.0.1/"),
        "pty.spawn": lambda: Call(Global("pty", "spawn"), "true"),
        "code.InteractiveInterpreter": lambda: Call(Global("code", "InteractiveInterpreter")),
        "dotted name posixpath+os.system": lambda: _canary_call("posixpath", "os.system", c),
        "STACK_GLOBAL os.system": lambda: _canary_call("os", "system", c, opcode="STACK_GLOBAL"),
        "INST os.system": lambda: Raw(b"(S'touch " + str(c).encode() + b"'\nios\nsystem\n"),
        "OBJ subprocess.Popen": lambda: Raw(b"(csubprocess\nPopen\nS'true'\no"),
        "NEWOBJ subprocess.Popen": lambda: New(Global("subprocess", "Popen"), "true"),
        "NEWOBJ_EX subprocess.Popen": lambda: New(Global("subprocess", "Popen"), "true", kwargs={"shell": True}),
        # 2024-2026 bypasses of pickle scanners: trampolines, indirection, nesting
        "pkgutil.resolve_name": lambda: Call(Call(Global("pkgutil", "resolve_name"), "os:system"), f"touch {c}"),
        "importlib.util.spec_from_file_location": lambda: Call(Global("importlib.util", "spec_from_file_location"),
                                                               "x", str(c)),
        "importlib._bootstrap._gcd_import": lambda: Call(Global("importlib._bootstrap", "_gcd_import"), "os"),
        "operator.attrgetter trampoline": lambda: Call(Call(Global("operator", "attrgetter"), "system"),
                                                       Call(Global("builtins", "__import__"), "os")),
        "operator.methodcaller trampoline": lambda: Call(Call(Global("_operator", "methodcaller"), "system",
                                                              f"touch {c}"), Global("os", "path")),
        "functools.partial trampoline (STACK_GLOBAL)": lambda: Call(Call(
            Global("functools", "partial", "STACK_GLOBAL"), Global("os", "system"), f"touch {c}")),
        "memo-indirected os.system": lambda: Call(MemoGlobal("os", "system"), f"touch {c}"),
        "memo-indirected dotted builtins.eval": lambda: Call(MemoGlobal("builtins", "eval"), "1"),
        "dotted name pathlib+os.system": lambda: _canary_call("pathlib", "os.system", c),
        "dotted name collections+os.system (STACK_GLOBAL)": lambda: _canary_call("collections", "os.system", c,
                                                                                 opcode="STACK_GLOBAL"),
        "nested pickle.loads of os.system": lambda: Call(Global("pickle", "loads"), dumps(_canary_call("os", "system", c))),
        "nested _pickle.loads (protocol 0)": lambda: Call(Global("_pickle", "loads"),
                                                          b"cos\nsystem\n(S'touch " + str(c).encode() + b"'\ntR."),
        "nested marshal.loads of code": lambda: Call(Global("marshal", "loads"), b"\xe3" + b"\x00" * 32),
        "torch.storage._load_from_bytes": lambda: Call(Global("torch.storage", "_load_from_bytes"), b"\x80\x02N."),
        "numpy object array with a callable": lambda: Build(
            Call(Global("numpy.core.multiarray", "_reconstruct"), Global("numpy", "ndarray"), (0,), b"b"),
            (1, (2,), Call(Global("numpy", "dtype"), "O", False, True), False, [Global("os", "system"), 1])),
        # changing the allow-list's stand-ins: nothing a file does may survive it
        "BUILD on a storage type": lambda: Build(Global("torch", "FloatStorage"), (None, {"_value": "int64"})),
        "BUILD dict on a storage type": lambda: Build(Global("torch", "FloatStorage"), {"dtype": "int64"}),
        "BUILD on a rebuild function": lambda: Build(Global("torch._utils", "_rebuild_tensor_v2"),
                                                     (None, {"_fn": Global("collections", "OrderedDict")})),
        "BUILD on a stub class": lambda: Build(Global("evil", "Thing"), (None, {"__array_interface__": {}})),
        "BUILD on OrderedDict": lambda: Build(Global("collections", "OrderedDict"), {"__init__": 1}),
        # allow-listed containers posing as arrays (numpy would follow the interface)
        "OrderedDict with a buffer interface": lambda: _spoof_container({"data": b"\x00", "shape": (1 << 16,),
                                                                         "typestr": "<f4", "version": 3}),
        "OrderedDict with a pointer interface": lambda: _spoof_container({"data": (4096, False), "shape": (16,),
                                                                          "typestr": "<f4", "version": 3}),
        "Parameter of an OrderedDict posing as an array": lambda: Call(
            Global("torch._utils", "_rebuild_parameter"),
            _spoof_container({"data": (4096, False), "shape": (16,), "typestr": "<f4", "version": 3}), False,
            Call(_ORDERED_DICT)),
        "numpy _frombuffer of a size": lambda: Call(Global("numpy._core.numeric", "_frombuffer"), 1 << 33,
                                                    Call(Global("numpy", "dtype"), "f4", False, True), (1 << 31,), "C"),
        # code-execution gadgets outside the obvious families
        "pydoc.pipepager": lambda: Call(Global("pydoc", "pipepager"), "x", f"touch {c}"),
        "uuid._get_command_stdout": lambda: Call(Global("uuid", "_get_command_stdout"), "touch", str(c)),
        "numpy.ctypeslib.load_library": lambda: Call(Global("numpy.ctypeslib", "load_library"), "libc", "/lib"),
        "logging.config.listen": lambda: Call(Global("logging.config", "listen"), 0),
        "idlelib.pyshell.ModifiedInterpreter": lambda: Call(Global("idlelib.pyshell", "ModifiedInterpreter"), None),
        "lib2to3.main.main": lambda: Call(Global("lib2to3.main", "main"), "lib2to3.fixes"),
        # stub attribute spoofing: a fake storage handed to a tensor rebuilder
        "stub storage with pointer interface": lambda: rebuild(_spoof({
            "shape": (1 << 20,), "dtype": "float32", "numel": 1 << 20,
            "__array_interface__": {"data": (4096, False), "shape": (1 << 20,), "typestr": "<f4", "version": 3}}),
            0, (1 << 20,), (1,)),
        "stub storage with object typestr": lambda: rebuild(_spoof({
            "__array_interface__": {"data": (4096, False), "shape": (4,), "typestr": "|O", "version": 3}}),
            0, (4,), (1,)),
        "stub storage with small buffer, large shape": lambda: rebuild(_spoof({
            "__array_interface__": {"data": b"\x00" * 16, "shape": (1 << 30,), "typestr": "<f4"}}),
            0, (1 << 30,), (1,)),
        "stub storage from constructor args": lambda: rebuild(New(Global("torch", "UntypedStorage"), 1 << 40), 0, (4,), (1,)),
        "allow-listed dtype token as storage": lambda: rebuild(Global("torch", "float32"), 0, (4,), (1,)),
        # persistent-id abuse
        "persistent id of unknown kind": lambda: Persist(("module", "x", "y", "z", 4)),
        "persistent id with negative numel": lambda: rebuild(t.storage(b"", -5, key="neg"), 0, (4,), (1,)),
        "persistent id with huge numel": lambda: rebuild(t.storage(b"\x00" * 64, 1 << 50, key="huge"), 0, (4,), (1,)),
        "persistent id naming a missing storage": lambda: rebuild(Persist(("storage", Global("torch", "FloatStorage"),
                                                                   "../../etc/passwd", "cpu", 4)), 0, (4,), (1,)),
        "persistent id with a non-integer numel": lambda: rebuild(t.storage(b"\x00" * 16, "4", key="str"), 0, (4,), (1,)),
        # views outside their storage
        "negative stride": lambda: rebuild(small(), 0, (16,), (-1,)),
        "negative stride reaching back": lambda: rebuild(small(), 15, (64,), (-1,)),
        "zero stride over 1e10 elements": lambda: rebuild(small(), 0, (100000, 100000), (0, 0)),
        "offset past the storage": lambda: rebuild(small(), 1 << 40, (4,), (1,)),
        "negative offset": lambda: rebuild(small(), -4096, (4,), (1,)),
        "overflowing shape": lambda: rebuild(small(), 0, (1 << 62, 1 << 62), (1, 1)),
        "overflowing stride": lambda: rebuild(small(), 0, (2, 2), (1 << 63, 1)),
        "shape of strings": lambda: rebuild(small(), 0, ("4",), (1,)),
        "shape and stride of different length": lambda: rebuild(small(), 0, (4, 4), (1,)),
        # harmless-looking constructors abused for resources or code paths
        "_codecs.encode with a codec": lambda: Call(Global("_codecs", "encode"), "x", "rot13"),
        "bytearray of a huge size": lambda: Call(Global("builtins", "bytearray"), 1 << 40),
        "numpy _reconstruct of a huge shape": lambda: Call(Global("numpy.core.multiarray", "_reconstruct"),
                                                   Global("numpy", "ndarray"), (1 << 40,), b"b"),
        "numpy dtype of objects": lambda: Call(Global("numpy", "dtype"), "O", False, True),
        "copyreg._reconstructor of an allowed type": lambda: Call(Global("copyreg", "_reconstructor"),
                                                          Global("collections", "OrderedDict"),
                                                          Global("builtins", "object"), None),
        "NEWOBJ of an allowed function": lambda: New(Global("torch._utils", "_rebuild_tensor_v2")),
        "calling an inert record": lambda: Call(Call(Global("evil", "Factory")), "again"),
        # resource attacks
        "huge memo index": lambda: Raw(b"K\x01r\xff\xff\xff\x7f"),
        "memo entry never stored": lambda: Raw(b"j\xff\xff\xff\x00"),
        "deep nesting": lambda: _raw_deep(20000),
        "millions of tiny tensors": lambda: _many_tensors(small(), 140_000),
    }
    return out


# only where tensors of a state dict are read (elsewhere they are inert values, rightly ignored)
STATE_DICT_ONLY = {
    "quantized tensor": lambda c, t: Call(Global("torch._utils", "_rebuild_qtensor"),
                                         t.storage(b"\x00" * 4, 4, "QInt8Storage"), 0, (4,), (1,), ()),
    "float8 tensor": lambda c, t: Call(Global("torch._utils", "_rebuild_tensor_v3"),
                                      t.storage(b"\x00" * 4, 4, "UntypedStorage"), 0, (4,), (1,), False,
                                      Call(Global("collections", "OrderedDict")), Global("torch", "float8_e4m3fn")),
}
# file-level damage of zip checkpoints
ZIP_ONLY = ("flipped tensor bytes (CRC-32)", "zip bomb data.pkl", "compressed storage",
            "member listed twice", "zip flag 0x1 (encrypted)", "zip flag 0x20 (patched)",
            "zip flag 0x40 (strong encryption)", "local header names another member",
            "second pickle stream in data.pkl", "two data.pkl members", "protocol-0 pickle without magic",
            "protocol-1 pickle without magic", "7z-wrapped checkpoint", "broken pickle after a hostile global",
            "hostile pickle before a valid zip (polyglot)", "one byte before a valid zip")


# -- planting ----------------------------------------------------------------------------------
PLANTED_AT = "a.0.weight_orig"   # the weight a payload replaces


def _state_dict(path: Path, t: Tensors, skip: str | None = None) -> OrderedDict:
    import torch

    obj = torch.load(path, weights_only=True)
    sd = obj.get("state_dict", obj)
    return OrderedDict((k, t.tensor(v.numpy()) if k != skip else None) for k, v in sd.items())


def prune_style_run(dest: Path, legacy: bool, plant) -> Path:
    """The closed-form prune-style run with round 1 rewritten around `plant(tensors, state_dict)`."""
    shutil.copytree(FIXTURES / "closed-form" / "prune-style", dest)
    target = dest / "1checkpoint.pth.tar"
    t = Tensors(legacy)
    sd = _state_dict(target, t, skip=PLANTED_AT)
    obj = {"state": 1, "state_dict": plant(t, sd)}
    data = dumps(obj)
    (write_legacy(target, data, t.storages) if legacy else write_zip(target, data, t.storages))
    return target


def bert_module_run(dest: Path, payload_fn) -> Path:
    """The BERT-Tickets fixture with checkpoint-1000/model.pt a pickled module holding the payload."""
    shutil.copytree(FIXTURES / "bert-tickets" / "mrpc", dest)
    target = dest / "checkpoint-1000" / "model.pt"
    t = Tensors()
    import torch

    params = OrderedDict((k, t.tensor(v.numpy())) for k, v in
                         torch.load(dest / "checkpoint-500" / "mask.pt", weights_only=True).items())
    params["evil"] = payload_fn(t)
    module = Build(New(Global("transformers.modeling_bert", "BertForSequenceClassification")),
                   {"training": False, "_parameters": params, "_buffers": OrderedDict(),
                    "_modules": OrderedDict()})
    write_zip(target, dumps(module), t.storages)
    return target


def bert_result_run(dest: Path, payload_fn) -> Path:
    shutil.copytree(FIXTURES / "bert-tickets" / "mrpc", dest)
    target = dest / "result.pt"
    t = Tensors()
    write_zip(target, dumps([{"acc": 0.8}, {"acc": payload_fn(t)}]), t.storages)
    return target


def _patch_entries(path: Path, signature: bytes, name_at: int, name_len_at: int, patch) -> None:
    """Call patch(raw, offset, name) on each zip header with this signature, then write the file back."""
    raw = bytearray(path.read_bytes())
    pos = raw.find(signature)
    while pos >= 0:
        n = int.from_bytes(raw[pos + name_len_at:pos + name_len_at + 2], "little")
        patch(raw, pos, bytes(raw[pos + name_at:pos + name_at + n]))
        pos = raw.find(signature, pos + 4)
    path.write_bytes(bytes(raw))


def zip_damage(kind: str, dest: Path, canary: Path = Path("/nonexistent")) -> Path:
    shutil.copytree(FIXTURES / "closed-form" / "prune-style", dest)
    target = dest / "1checkpoint.pth.tar"
    t = Tensors()
    sd = _state_dict(target, t)
    data = dumps({"state": 1, "state_dict": sd})
    if kind == "flipped tensor bytes (CRC-32)":
        write_zip(target, data, t.storages)
        raw = bytearray(target.read_bytes())
        at = raw.index(t.storages["0"][1][:32]) + 100   # inside the first weight's bytes
        raw[at] ^= 0x40
        target.write_bytes(bytes(raw))
    elif kind == "zip bomb data.pkl":
        bomb = data[:-1] + b"N" * (600 << 20) + b"0."   # pushes and pops None, 600 MiB of it
        write_zip(target, bomb, t.storages, compress_pkl=True)
    elif kind == "compressed storage":
        with zipfile.ZipFile(target, "w") as zf:
            zf.writestr("archive/data.pkl", data)
            for key, (_n, raw) in t.storages.items():
                zf.writestr(f"archive/data/{key}", raw, compress_type=zipfile.ZIP_DEFLATED)
    elif kind.startswith("zip flag"):
        write_zip(target, data, t.storages)
        flag = int(kind.split()[2], 16)
        _patch_entries(target, b"PK\x01\x02", 46, 28, lambda raw, pos, name: raw.__setitem__(
            pos + 8, raw[pos + 8] | flag) if name.endswith(b"/data/0") else None)
    elif kind == "local header names another member":
        write_zip(target, data, t.storages)
        _patch_entries(target, b"PK\x03\x04", 30, 26, lambda raw, pos, name: raw.__setitem__(
            pos + 30 + len(name) - 1, ord("1")) if name.endswith(b"/data/0") else None)
    elif kind == "second pickle stream in data.pkl":
        write_zip(target, data + dumps(_canary_call("os", "system", canary)), t.storages)
    elif kind == "two data.pkl members":
        write_zip(target, data, t.storages, extra=[("other/data.pkl", dumps(_canary_call("os", "system", canary)),
                                                    zipfile.ZIP_STORED)])
    elif kind.startswith("protocol-"):
        target.write_bytes(dumps(_canary_call("os", "system", canary), protocol=int(kind[9])))
    elif kind == "7z-wrapped checkpoint":
        target.write_bytes(b"7z\xbc\xaf\x27\x1c\x00\x04" + b"\x00" * 24 + data)
    elif kind == "broken pickle after a hostile global":
        target.write_bytes(b"\x80\x02cos\nsystem\nq\x00X\x05\x00\x00\x00touch")
    elif kind in ("hostile pickle before a valid zip (polyglot)", "one byte before a valid zip"):
        write_zip(target, data, t.storages)   # torch.load sees no zip at byte 0 and unpickles the start
        prefix = dumps(_canary_call("os", "system", canary)) if "polyglot" in kind else b"\x00"
        target.write_bytes(prefix + target.read_bytes())
    elif kind == "member listed twice":
        with warnings.catch_warnings():   # zipfile warns, rightly
            warnings.simplefilter("ignore")
            write_zip(target, data, t.storages, extra=[("archive/data/0", b"\x00" * len(t.storages["0"][1]),
                                                        zipfile.ZIP_STORED)])
    return target


CONTAINERS = ("zip", "legacy", "bert-module", "bert-result")
ZIP_CONTAINER_ONLY = ("millions of tiny tensors",)   # slow to write; the limit is the same everywhere


def plant(kind: str, container: str, dest: Path, canary: Path) -> Path:
    """Write the run `dest` with payload `kind` planted in `container`; returns the bad file."""
    def payload(t: Tensors):
        if kind in STATE_DICT_ONLY:
            return STATE_DICT_ONLY[kind](canary, t)
        return payloads(canary, t)[kind]()

    if kind in ZIP_ONLY:
        return zip_damage(kind, dest, canary)
    if container in ("zip", "legacy"):
        def replace_weight(t, sd):
            sd[PLANTED_AT] = payload(t)
            return sd
        return prune_style_run(dest, container == "legacy", replace_weight)
    if container == "bert-module":
        return bert_module_run(dest, payload)
    return bert_result_run(dest, payload)


def corpus(root: Path, canary: Path, kinds=None, containers=CONTAINERS) -> dict[str, Path]:
    """Every (payload, container) as its own run below `root`; returns run name -> bad file."""
    kinds = kinds or kind_names()
    out = {}
    for k, kind in enumerate(kinds):
        for container in containers:
            if (kind in ZIP_ONLY + ZIP_CONTAINER_ONLY and container != "zip") or (kind in STATE_DICT_ONLY and container == "bert-result"):
                continue
            name = f"bad_{k:03d}_{container}"
            out[name] = plant(kind, container, root / name, canary)
    return out


def kind_names() -> list[str]:
    return list(payloads(Path("/nonexistent"), Tensors())) + list(STATE_DICT_ONLY) + list(ZIP_ONLY)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "hostile-corpus")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(FIXTURES / "closed-form" / "safetensors", out / "zz_good", dirs_exist_ok=True)
    files = corpus(out, out / "CANARY")
    print(f"{len(kind_names())} payload kinds, {len(files)} bad runs and one good run in {out}")
