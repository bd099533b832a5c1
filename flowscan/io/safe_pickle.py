"""A restricted unpickler: nothing a pickle names is ever imported or run.

Pickled checkpoints name the classes and functions that rebuild them; plain `pickle` imports and
calls whatever they name, so a checkpoint can run any code. Here every name is one of three kinds:

* **allowed**: tensor rebuilders, containers and numpy reconstructors resolve to immutable
  stand-ins (the ones bound to a file's storages are made for that file), so nothing one file
  does can change how another is read;
* **hostile**: names of the code-execution families that pickle scanners flag (`os`,
  `subprocess`, `builtins.eval`, `functools.partial`, `torch.hub`, ... see `HOSTILE_MODULES` and
  `HOSTILE_NAMES`) refuse the whole file with `UnsafePickleError`, naming the global;
* **anything else** becomes an inert `Stub` class. Creating or calling it never runs code: the
  result is an inert record of the call, and `Unpickled.not_executed` lists each such name so
  the reader can say what it left alone (e.g. Lightning's `pathlib`/`datetime` hyper-parameters).

A stub keeps its pickled state in one private slot, never as attributes: no pickled key can
become `shape`, `dtype`, `__array_interface__` or anything else that numpy, Python or flowscan
would honour. Before unpickling, the opcode stream is checked (`prescan`, one tight loop over a
table derived from pickletools) for resource attacks: absurd memo indices, gets of entries never
stored, nesting past a limit, and sizes past the stream's end.
"""

from __future__ import annotations

import _compat_pickle
import builtins
import codecs
import collections
import hashlib
import io
import pickle
import pickletools
import sys
import threading
from collections import Counter
from typing import Any, Callable

import numpy as np

try:  # numpy >= 2 moved these; pickles from either era name either module
    from numpy._core.multiarray import _reconstruct as _np_reconstruct, scalar as _np_scalar
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct, scalar as _np_scalar

from flowscan.errors import ScanError, UnsafePickleError

# Module families whose every name can run code, read or write files, or reach the network.
HOSTILE_MODULES = frozenset({
    "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "_posixsubprocess", "sys", "importlib",
    "runpy", "pickle", "_pickle", "cPickle", "marshal", "ctypes", "_ctypes", "socket", "_socket",
    "shutil", "pty", "commands", "webbrowser", "code", "codeop", "pdb", "bdb", "asyncio",
    "multiprocessing", "signal", "platform", "pip", "timeit", "trace", "cProfile", "profile",
    "types", "dill", "cloudpickle", "joblib", "zipimport", "pkgutil", "requests", "urllib",
    "urllib2", "urllib3", "http", "httplib", "ftplib", "smtplib", "telnetlib", "aiohttp", "ssl",
    "io", "_io", "tempfile", "glob", "threading", "_thread", "gc", "inspect", "site", "ensurepip",
    "venv", "distutils", "setuptools", "torch.hub", "torch.serialization", "torch._inductor",
    "torch.jit", "torch.package", "torch._dynamo", "torch.utils.cpp_extension", "numpy.testing",
    "numpy.f2py", "numpy.distutils",
    # standard-library families whose classes, too, run programs, open files or listen on sockets
    "pydoc", "idlelib", "lib2to3", "logging", "zipfile", "tarfile", "shelve", "dbm", "sqlite3",
    "mailbox", "xmlrpc", "socketserver", "wsgiref", "tkinter", "turtle", "turtledemo", "doctest",
    "unittest", "cgi", "cgitb", "concurrent", "sched", "mmap", "fcntl", "select", "selectors",
    "imaplib", "poplib", "nntplib", "mimetypes", "compileall", "py_compile", "zipapp", "fileinput",
    "linecache", "tabnanny", "pstats", "resource", "pwd", "grp", "termios", "tty", "curses",
    "readline", "rlcompleter", "sysconfig", "_sitebuiltins", "antigravity",
    # third-party gadgets: native libraries, graph code generation, pickle and YAML loaders
    "numpy.ctypeslib", "numpy.lib.npyio", "numpy.lib._npyio_impl", "numpy.lib.format",
    "numpy.lib._format_impl", "torch.fx", "torch._ops", "torch.ops", "torch.distributed",
    "torch.multiprocessing", "torch.testing", "torch._C", "torch.library", "torch.compiler",
    "torch.utils._config_module", "yaml", "ruamel", "jinja2", "mako", "pandas.io", "IPython",
    "huggingface_hub", "transformers.dynamic_module_utils", "keras.utils", "tensorflow.io",
    "sklearn.externals", "_pytest", "pytest",
})
# Single names that run code, load pickles or touch files.
HOSTILE_NAMES = frozenset({
    ("builtins", n) for n in ("eval", "exec", "execfile", "compile", "__import__", "getattr",
                              "setattr", "delattr", "open", "input", "breakpoint", "globals",
                              "locals", "vars", "apply", "file", "reload", "exit", "quit", "help",
                              "__loader__", "__build_class__", "memoryview", "type", "super",
                              "map", "filter", "property", "classmethod", "staticmethod")
} | {
    ("operator", "attrgetter"), ("operator", "methodcaller"), ("_operator", "attrgetter"),
    ("_operator", "methodcaller"), ("functools", "partial"), ("functools", "reduce"),
    ("_functools", "partial"), ("_functools", "reduce"), ("torch", "load"), ("torch", "save"),
    ("torch", "from_file"), ("numpy", "load"), ("numpy", "fromfile"), ("numpy", "save"),
    ("numpy", "loadtxt"), ("numpy", "genfromtxt"), ("numpy.lib.npyio", "load"),
    ("codecs", "open"), ("codecs", "lookup"), ("pathlib", "Path.write_text"),
    ("torch.storage", "_load_from_bytes"),   # a torch.load wrapper
})
# Plain data types that live in modules of the families above (enums, named tuples, namespaces):
# creating them runs no code, so they are kept as inert records like any other class, not refused.
BENIGN_NAMES = frozenset({
    ("http", "HTTPStatus"), ("http", "HTTPMethod"), ("types", "SimpleNamespace"), ("signal", "Signals"),
    ("signal", "Handlers"), ("signal", "Sigmasks"), ("socket", "AddressFamily"), ("socket", "SocketKind"),
    ("ssl", "Purpose"), ("ssl", "TLSVersion"), ("ssl", "VerifyMode"), ("platform", "uname_result"),
    ("os", "stat_result"), ("os", "terminal_size"), ("posix", "stat_result"), ("sys", "version_info"),
    ("inspect", "_ParameterKind"), ("multiprocessing.process", "AuthenticationString"),
})
_HOSTILE_COMPONENTS = frozenset(m for m in HOSTILE_MODULES if "." not in m) | frozenset(
    n for _m, n in HOSTILE_NAMES if _m == "builtins")

MAX_PICKLE_BYTES = 512 << 20   # tensors live outside the pickle; a real one is KBs to a few MBs
MAX_MEMO_INDEX = 1 << 24       # pickle writes memo indices 0, 1, 2, ... in order
MAX_STACK_DEPTH = 5_000        # nesting; a pickled BERT module reaches a few dozen


# Standard-library names that are data types although not written in CapWords
STDLIB_DATA = frozenset({
    ("datetime", "datetime"), ("datetime", "date"), ("datetime", "time"), ("datetime", "timedelta"),
    ("datetime", "timezone"), ("collections", "deque"), ("collections", "defaultdict"),
    ("array", "array"), ("array", "_array_reconstructor"), ("copyreg", "_reconstructor"),
    ("copyreg", "__newobj__"), ("copyreg", "__newobj_ex__"), ("_codecs", "encode"),
})
_STDLIB = frozenset(getattr(sys, "stdlib_module_names", ())) | {"__builtin__", "copy_reg"}


def _is_class_name(name: str) -> bool:
    return name[:1].isupper()


def is_hostile(module: str, name: str) -> bool:
    """A name that can run code, load a pickle or touch files (refused); data types are not.

    Besides the families named above: a function of the standard library (a name not written as a
    class, or a private one), or a method reached through a dotted name, is a callable that can run
    code, never a data type, so naming one makes the file hostile even though nothing would call it
    here. Unknown classes of other packages stay inert records."""
    if (module, name) in BENIGN_NAMES or (module, name) in STDLIB_DATA:
        return False
    if (module, name) in HOSTILE_NAMES:
        return True
    if any(module == m or module.startswith(m + ".") for m in HOSTILE_MODULES):
        return True
    parts = name.split(".")
    # a dotted name is resolved attribute by attribute by pickle (`posixpath` + `os.system`,
    # `pathlib.Path.write_text`): only nested classes are data
    if len(parts) > 1 and (any(p in _HOSTILE_COMPONENTS for p in parts) or not _is_class_name(parts[-1])):
        return True
    top = module.split(".")[0]
    if top in _STDLIB:
        if top in ("builtins", "__builtin__"):
            return not isinstance(getattr(builtins, name, None), type)
        return top.startswith("_") or not _is_class_name(parts[-1])
    return False


class _Rejected(Exception):
    """Raised inside the unpickler when a file is refused; converted with the file's name."""


class StubState:
    """What a pickle said about one stub instance: constructor arguments, state and items."""

    __slots__ = ("args", "kwargs", "state", "items", "mapping", "called")

    def __init__(self, args=(), kwargs=None, called=False):
        self.args, self.kwargs, self.called = tuple(args), dict(kwargs or {}), called
        self.state, self.items, self.mapping = None, [], {}


class _StubMeta(type):
    def __call__(cls, *args, **kwargs):
        # REDUCE of an unknown callable: record the call, run nothing
        cls._stub_calls[f"{cls.__module__}.{cls.__qualname__}"] += 1
        obj = cls.__new__(cls, *args, **kwargs)
        object.__getattribute__(obj, "_stub").called = True
        return obj

    def __setattr__(cls, name, value):
        raise _Rejected(f"a pickle tried to set attribute {name!r} of class {cls.__qualname__}")

    __delattr__ = __setattr__

    def __repr__(cls):
        return f"<stub {cls.__module__}.{cls.__qualname__}>"


class Stub(metaclass=_StubMeta):
    """Inert stand-in for an object of a class that is never imported."""

    __slots__ = ("_stub",)

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        object.__setattr__(obj, "_stub", StubState(args, kwargs))
        return obj

    def __setattr__(self, name, value):  # BUILD with slot state
        raise _Rejected(f"a pickle tried to set attribute {name!r} of a {type(self).__qualname__}")

    __delattr__ = __setattr__

    def __setstate__(self, state):       # BUILD
        self._stub.state = state

    def append(self, item):              # APPEND(S) on list-like objects
        self._stub.items.append(item)

    def extend(self, items):
        self._stub.items.extend(items)

    def __setitem__(self, key, value):   # SETITEM(S) on dict-like objects
        self._stub.mapping[key] = value

    def __repr__(self):
        return f"<stub {type(self).__module__}.{type(self).__qualname__} object>"


def stub_state(obj: Stub) -> dict:
    """A stub's attribute dict as pickled (`__dict__` state, or the dict of (dict, slots))."""
    state = object.__getattribute__(obj, "_stub").state
    if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
        merged = dict(state[0] or {})
        if isinstance(state[1], dict):
            merged.update(state[1])
        return merged
    return state if isinstance(state, dict) else {}


def _stub_class(module: str, name: str, calls: Counter) -> type:
    return _StubMeta(name, (Stub,), {"__module__": module, "__qualname__": name, "__slots__": (),
                                      "_stub_calls": calls})


class Allowed:
    """An allow-listed callable: immutable (a pickle's BUILD or SETATTR on it is refused)."""

    __slots__ = ("_name", "_fn")

    def __init__(self, name: str, fn: Callable):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def __setattr__(self, name, value):
        raise _Rejected(f"a pickle tried to change the allow-listed {self._name}")

    __delattr__ = __setattr__

    def __repr__(self):
        return f"<allowed {self._name}>"


class Token(Allowed):
    """An allow-listed name used as a value, not called (e.g. `numpy.ndarray`, `torch.float32`)."""

    def __init__(self, name: str, value: Any = None):
        super().__init__(name, _not_callable(name))
        object.__setattr__(self, "_value", value)

    __slots__ = ("_value",)

    @property
    def value(self):
        return self._value


def _not_callable(name: str):
    def refuse(*args, **kwargs):
        raise _Rejected(f"{name} is not a constructor flowscan accepts")
    return refuse


_TEXT_ENCODINGS = frozenset({"latin1", "latin-1", "iso-8859-1", "utf-8", "utf8", "ascii"})


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    # protocol-2 bytes are pickled as _codecs.encode(str, 'latin1')
    if not isinstance(text, str) or str(encoding).lower() not in _TEXT_ENCODINGS or errors != "strict":
        raise _Rejected(f"_codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, encoding)


def _bytearray(*args):
    # bytearray(n) would allocate n zero bytes: accept only data
    if args and not isinstance(args[0], (bytes, str)):
        raise _Rejected("builtins.bytearray of a size")
    return bytearray(*args)


def _reconstructor(cls, base, state=None):
    # copyreg._reconstructor(cls, base, state): object creation without running __init__
    if isinstance(cls, type) and issubclass(cls, Stub):
        obj = cls.__new__(cls)
        if state is not None:
            obj.__setstate__(state)
        return obj
    raise _Rejected(f"copyreg._reconstructor for {cls!r}")


def _newobj(cls, *args):
    if isinstance(cls, type) and issubclass(cls, Stub):
        return cls.__new__(cls, *args)
    raise _Rejected(f"copyreg.__newobj__ for {cls!r}")


def _newobj_ex(cls, args, kwargs):
    if isinstance(cls, type) and issubclass(cls, Stub):
        return cls.__new__(cls, *args, **kwargs)
    raise _Rejected(f"copyreg.__newobj_ex__ for {cls!r}")


def _np_dtype(spec, align=False, copy=True):
    if isinstance(spec, Token):
        spec = spec.value
    dtype = np.dtype(spec, align=bool(align), copy=True)  # never numpy's shared singletons
    if dtype.hasobject:
        raise _Rejected("numpy.dtype of Python objects")
    return dtype


def _ndarray_reconstruct(cls, shape, typecode):
    # numpy pickles arrays as _reconstruct(ndarray, (0,), b'b') + BUILD(state); anything
    # else (subclasses, allocations of an attacker's size) is refused
    if not (isinstance(cls, Token) and cls.value is np.ndarray) or tuple(shape) != (0,):
        raise _Rejected(f"numpy _reconstruct of {cls!r} with shape {shape!r}")
    return _np_reconstruct(np.ndarray, (0,), b"b")


def _np_frombuffer(buffer, dtype, shape, order):
    # numpy's protocol-5 arrays: numpy._core.numeric._frombuffer(buf, dtype, shape, order); the
    # buffer must be bytes the pickle holds (`bytes(n)` of an integer would make n bytes from nothing)
    if type(buffer) not in (bytes, bytearray, memoryview):
        raise _Rejected(f"numpy _frombuffer of a {type(buffer).__name__}, not of bytes the file holds")
    dtype = _np_dtype(dtype)
    if order not in ("C", "F"):
        raise _Rejected(f"numpy _frombuffer with order {order!r}")
    return np.frombuffer(bytes(buffer), dtype=dtype).reshape(tuple(shape), order=order)


def _scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise _Rejected("numpy scalar of a non-numeric dtype")
    return _np_scalar(dtype, data)


# Attribute names that would make a container look like an array (or change how Python treats it)
_ARRAY_ATTRIBUTES = frozenset({"shape", "dtype", "ndim", "strides", "data", "size", "itemsize", "nbytes"})


class PickledOrderedDict(collections.OrderedDict):
    """`collections.OrderedDict` as a pickle rebuilds it. A real OrderedDict has a `__dict__`, so a
    pickle's BUILD could give it `shape`, `dtype` and `__array_interface__` and numpy would follow a
    pointer of the attacker's choice. Here BUILD's state (torch keeps a state dict's `_metadata`
    there) is kept in a private slot, never as attributes; array-like or dunder names are refused."""

    __slots__ = ("_pickled_state",)

    def __setstate__(self, state):
        names = _state_names(state)
        bad = sorted(n for n in names if not isinstance(n, str) or n.startswith("__") or n in _ARRAY_ATTRIBUTES)
        if bad:
            raise _Rejected(f"a pickle tried to give collections.OrderedDict the attribute {bad[0]!r}")
        object.__setattr__(self, "_pickled_state", state)

    def __setattr__(self, name, value):
        raise _Rejected(f"a pickle tried to set attribute {name!r} of collections.OrderedDict")

    __delattr__ = __setattr__


def _state_names(state) -> list:
    """The attribute names a BUILD state would set: keys of a dict, or of both halves of (dict, slots)."""
    parts = state if isinstance(state, tuple) and len(state) == 2 else (state,)
    names: list = []
    for part in parts:
        if isinstance(part, dict):
            names.extend(part)
        elif part is not None:
            raise _Rejected(f"BUILD state of a {type(part).__name__} for collections.OrderedDict")
    return names


def _defaultdict(*args):
    return collections.defaultdict(None, *args[1:])   # never keep a default factory


def base_allowed() -> dict[tuple[str, str], Any]:
    """The allow-list: names a pickle may refer to, and their stand-ins. The stand-ins refuse every
    attribute change (slots, no __setstate__), so one set serves every file; the dict is a copy."""
    if not _BASE_ALLOWED:
        _BASE_ALLOWED.update(_make_base_allowed())
    return dict(_BASE_ALLOWED)


_BASE_ALLOWED: dict[tuple[str, str], Any] = {}


def _make_base_allowed() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): PickledOrderedDict,   # these and the C types below take no attributes
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "slice"): slice,
        ("builtins", "complex"): complex,
        ("builtins", "object"): Token("builtins.object"),
    }
    functions = {
        ("collections", "defaultdict"): _defaultdict,
        ("builtins", "bytearray"): _bytearray,
        ("_codecs", "encode"): _codecs_encode,
        ("copyreg", "_reconstructor"): _reconstructor,
        ("copyreg", "__newobj__"): _newobj,
        ("copyreg", "__newobj_ex__"): _newobj_ex,
        ("numpy", "dtype"): _np_dtype,
    }
    for prefix in ("numpy.core", "numpy._core"):
        functions[(f"{prefix}.multiarray", "scalar")] = _scalar
        functions[(f"{prefix}.multiarray", "_reconstruct")] = _ndarray_reconstruct
        functions[(f"{prefix}.numeric", "_frombuffer")] = _np_frombuffer
    for key, fn in functions.items():
        allowed[key] = Allowed(".".join(key), fn)
    allowed[("numpy", "ndarray")] = Token("numpy.ndarray", np.ndarray)
    # numpy scalar types appear as dtype arguments (e.g. numpy.float64)
    for name in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8",
                 "uint16", "uint32", "uint64", "bool_", "complex64", "complex128"):
        allowed[("numpy", name)] = Token(f"numpy.{name}", getattr(np, name))
    return allowed


def normalize(module: str, name: str) -> tuple[str, str]:
    """Python 2 names as pickle's fix_imports maps them (`__builtin__` -> `builtins`, ...)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed names and stubs every other class."""

    def __init__(self, file, allowed: dict[tuple[str, str], Any] | None = None,
                 persistent_load: Callable[[Any], Any] | None = None, **kwargs):
        super().__init__(file, **kwargs)
        self._allowed = base_allowed()
        if allowed:
            self._allowed.update(allowed)
        self._persistent = persistent_load
        self._stubs: dict[tuple[str, str], type] = {}
        self.calls: Counter = Counter()

    def find_class(self, module: str, name: str):
        if not isinstance(module, str) or not isinstance(name, str):
            raise _Rejected(f"a global named by non-strings {module!r}, {name!r}")
        key = normalize(module, name)
        if key in self._allowed:
            return self._allowed[key]
        if is_hostile(*key):
            raise UnsafePickleError(None, f"{key[0]}.{key[1]}")
        if key not in self._stubs:
            self._stubs[key] = _stub_class(key[0], key[1], self.calls)
        return self._stubs[key]

    def persistent_load(self, pid):
        if self._persistent is None:
            raise pickle.UnpicklingError("persistent id in a plain pickle")
        return self._persistent(pid)


class Unpickled:
    """A loaded object and the calls that were recorded instead of run."""

    __slots__ = ("value", "not_executed")

    def __init__(self, value: Any, not_executed: dict[str, int]):
        self.value, self.not_executed = value, not_executed

    def note(self) -> str | None:
        if not self.not_executed:
            return None
        names = ", ".join(f"{n} (x{c})" if c > 1 else n for n, c in sorted(self.not_executed.items()))
        return f"not executed (kept as inert records): {names}"


def _opcode_table() -> dict[int, tuple]:
    """Per opcode byte, derived from pickletools' own descriptions: (name, how its argument is laid
    out, its size, items it pops, where a MARK sits among them, items it pushes, pushes a MARK)."""
    widths = {pickletools.TAKEN_FROM_ARGUMENT1: 1, pickletools.TAKEN_FROM_ARGUMENT4: 4,
              pickletools.TAKEN_FROM_ARGUMENT4U: 4, pickletools.TAKEN_FROM_ARGUMENT8U: 8}
    table = {}
    for op in pickletools.opcodes:
        arg = op.arg
        if arg is None:
            layout, n = "none", 0
        elif arg.n >= 0:
            layout, n = "fixed", arg.n
        elif arg.n == pickletools.UP_TO_NEWLINE:
            layout, n = ("lines", 2) if arg.name == "stringnl_noescape_pair" else ("lines", 1)
        else:   # a length prefix (signed for int4), then that many bytes
            layout, n = ("signed" if arg.n == pickletools.TAKEN_FROM_ARGUMENT4 else "sized"), widths[arg.n]
        before, after = op.stack_before, op.stack_after
        mark = before.index(pickletools.markobject) if pickletools.markobject in before else -1
        table[op.code.encode("latin-1")[0]] = (op.name, layout, n, len(before), mark, len(after),
                                               pickletools.markobject in after)
    return table


_OPCODES = _opcode_table()
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}
_FIRST_READ = 1 << 16


class _NeedMore(Exception):
    """The buffer ends inside the pickle."""


def _scan(data: bytes, path: str) -> int:
    """Walk one pickle's opcodes in `data` (which may hold more after it) and return the offset after
    its STOP; refuse memory-exhaustion tricks (memo indices out of order, gets of entries never
    stored, nesting past MAX_STACK_DEPTH). One tight loop over a table: no objects are built."""
    pos, size, depth, puts, marks = 0, len(data), 0, 0, []
    table = _OPCODES
    while True:
        if pos >= size:
            raise _NeedMore
        entry = table.get(data[pos])
        if entry is None:
            raise ValueError(f"unknown opcode {data[pos]:#04x} at byte {pos}")
        name, layout, n, n_before, mark, n_after, pushes_mark = entry
        pos += 1
        arg_at = pos
        if layout == "fixed":
            pos += n
        elif layout == "sized" or layout == "signed":
            if pos + n > size:
                raise _NeedMore
            length = int.from_bytes(data[pos:pos + n], "little", signed=layout == "signed")
            if length < 0:
                raise ValueError(f"{name} of negative length at byte {arg_at}")
            pos += n + length
        elif layout == "lines":
            for _ in range(n):
                end = data.find(b"\n", pos)
                if end < 0:
                    raise _NeedMore
                pos = end + 1
        if pos > size:
            raise _NeedMore
        # the stack, as the unpickler will see it
        if mark >= 0:
            if not marks:
                raise ValueError(f"{name} without a MARK")
            depth = marks.pop() - mark
        else:
            depth -= n_before
        if pushes_mark:
            marks.append(depth)
        else:
            if depth < 0:
                raise ValueError(f"{name} on an empty stack")
            depth += n_after
        if depth > MAX_STACK_DEPTH or len(marks) > MAX_STACK_DEPTH:
            raise ScanError(path, f"pickle nests more than {MAX_STACK_DEPTH} levels deep "
                                  "(a resource attack; refused)")
        if name in _PUTS or name in _GETS:
            index = puts if name == "MEMOIZE" else _memo_index(name, data, arg_at, pos)
            if name in _GETS:
                if index >= puts:
                    raise ScanError(path, f"pickle refers to memo entry {index} that was never stored")
            else:
                if index > puts or index > MAX_MEMO_INDEX:
                    raise ScanError(path, f"pickle memo index {index} is out of order "
                                          "(a memory-exhaustion trick; refused)")
                puts += 1
        elif name == "STOP":
            return pos


def _memo_index(name: str, data: bytes, start: int, end: int) -> int:
    if name in ("PUT", "GET"):   # a decimal line
        return int(data[start:end - 1])
    return int.from_bytes(data[start:end], "little")


class _Passed(collections.OrderedDict):
    """Where the pickle ends in byte strings that passed `_scan` (by their digest), most recent last.
    `_scan` is a pure function of the bytes, and the rounds of one run hold the same pickle (same
    names, shapes, storage keys), so a repeat costs a hash instead of a walk in Python."""

    LIMIT = 256

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()   # reader threads share it

    def end(self, data: bytes, path: str) -> int:
        key = hashlib.blake2b(data, digest_size=16).digest()
        with self._lock:
            end = self.get(key)
            if end is not None:
                self.move_to_end(key)
                return end
        end = _scan(data, path)
        with self._lock:
            self[key] = end
            if len(self) > self.LIMIT:
                self.popitem(last=False)
        return end


_passed = _Passed()


def prescan(file, path: str, max_bytes: int = MAX_PICKLE_BYTES) -> bytes:
    """Check one pickle of a seekable file before anything is built (see `_scan`), and return its
    bytes, leaving the file just after it. A pickle larger than `max_bytes` is refused."""
    start, want = file.tell(), _FIRST_READ
    while True:
        file.seek(start)
        data = file.read(min(want, max_bytes + 1))
        try:
            end = _passed.end(data, path)
        except _NeedMore:
            if len(data) > max_bytes:
                raise ScanError(path, f"malformed pickle (or one over {max_bytes} bytes): no STOP "
                                      f"in its first {max_bytes} bytes") from None
            if len(data) < min(want, max_bytes + 1):
                raise ScanError(path, "malformed pickle: it ends before its STOP (truncated?)") from None
            want *= 8
            continue
        except ScanError:
            raise
        except Exception as exc:  # noqa: BLE001 - a malformed opcode stream
            raise ScanError(path, f"malformed pickle (or one over {max_bytes} bytes): "
                                  f"{type(exc).__name__}: {exc}") from None
        file.seek(start + end)
        return data[:end]


def safe_load(file, path: str = "<pickle>", *, max_bytes: int = MAX_PICKLE_BYTES, **kwargs) -> Unpickled:
    """Unpickle the next object of a seekable binary file, never running what it names.

    The file is left just after the pickle (legacy torch files hold several in a row)."""
    data = prescan(file, path, max_bytes)
    unpickler = RestrictedUnpickler(io.BytesIO(data), encoding="latin1", **kwargs)
    try:
        value = unpickler.load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(path, f"refused as hostile: the pickle names {exc.message}, "
                                      "which can run code (nothing was executed)") from None
    except _Rejected as exc:
        raise UnsafePickleError(path, f"refused: {exc} (nothing was executed)") from None
    except ScanError as exc:
        raise ScanError(exc.path or path, exc.message, exc.tensor) from None
    except RecursionError:
        raise ScanError(path, "pickle nests too deeply to read") from None
    except MemoryError:
        raise ScanError(path, "pickle needs more memory than this machine has (refused)") from None
    except Exception as exc:  # noqa: BLE001 - any other failure is a malformed file
        raise ScanError(path, f"malformed pickle: {type(exc).__name__}: {exc}") from None
    return Unpickled(value, dict(unpickler.calls))


def safe_loads(data: bytes, path: str = "<pickle>", **kwargs) -> Any:
    """The object of a pickle held in memory (for tests and small side files)."""
    return safe_load(io.BytesIO(data), path, **kwargs).value
