"""A restricted unpickler: it never imports a module and never calls anything off its allow-list.

Pickled checkpoints name the classes and functions that rebuild them; plain `pickle` imports and
calls whatever they name, so a checkpoint can run any code. Here, names on the allow-list resolve
to safe stand-ins (tensor rebuilders that make lazy arrays, containers, numpy reconstructors);
every other class becomes an inert `Stub` whose instances only hold their pickled state, and
calling any other name is refused with `UnsafePickleError` before anything runs.
"""

from __future__ import annotations

import collections
import codecs
import io
import pickle
from typing import Any, Callable

import numpy as np

try:  # numpy >= 2 moved these; pickles from either era name either module
    from numpy._core.multiarray import _reconstruct as _np_reconstruct, scalar as _np_scalar
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct, scalar as _np_scalar

from flowscan.errors import UnsafePickleError


class _StubMeta(type):
    def __call__(cls, *args, **kwargs):
        # Calling a class runs its __init__/__new__ code paths in the real library; refuse.
        raise _Refused(f"{cls.__module__}.{cls.__qualname__}")

    def __repr__(cls):
        return f"<stub {cls.__module__}.{cls.__qualname__}>"


class Stub(metaclass=_StubMeta):
    """Inert stand-in for a pickled object of a class we do not import; holds its state."""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_stub_args"] = args
        return obj

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state, slots = state  # (dict_state, slot_state) form
            if isinstance(slots, dict):
                self.__dict__.update(slots)
        if isinstance(state, dict):
            self.__dict__.update({str(k): v for k, v in state.items()})
        else:
            self.__dict__["_stub_state"] = state

    # pickle's BUILD falls back to these for list/dict-like objects
    def append(self, item):
        self.__dict__.setdefault("_stub_items", []).append(item)

    def extend(self, items):
        self.__dict__.setdefault("_stub_items", []).extend(items)

    def __setitem__(self, key, value):
        self.__dict__.setdefault("_stub_mapping", {})[key] = value


class _Refused(Exception):
    """Raised inside the unpickler; turned into UnsafePickleError with the file name."""


def _stub_class(module: str, name: str) -> type:
    return _StubMeta(name, (Stub,), {"__module__": module, "__qualname__": name})


def _reconstructor(cls, base, state=None):
    # copyreg._reconstructor(cls, object, None): object creation without running __init__.
    if isinstance(cls, type) and issubclass(cls, Stub) and base is object:
        return cls.__new__(cls)
    raise _Refused(f"copyreg._reconstructor for {cls!r}")


def _newobj(cls, *args):
    if isinstance(cls, type) and issubclass(cls, Stub):
        return cls.__new__(cls, *args)
    raise _Refused(f"copyreg.__newobj__ for {cls!r}")


# Names a pickle may call or refer to, and what they resolve to. Only pure data constructors.
BASE_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): lambda *a: collections.defaultdict(None),
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("__builtin__", "set"): set,
    ("_codecs", "encode"): lambda s, enc="utf-8", *a: codecs.encode(s, enc),  # protocol-2 bytes
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("copyreg", "__newobj__"): _newobj,
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
}
# numpy scalar types appear as dtype arguments (e.g. numpy.float64)
for _t in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool_"):
    BASE_ALLOWED[("numpy", _t)] = getattr(np, _t)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only `allowed` names and stubs every other class."""

    def __init__(self, file, allowed: dict[tuple[str, str], Any] | None = None,
                 persistent_load: Callable[[Any], Any] | None = None, **kwargs):
        super().__init__(file, **kwargs)
        self._allowed = dict(BASE_ALLOWED)
        if allowed:
            self._allowed.update(allowed)
        self._persistent = persistent_load
        self._stubs: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str):
        key = (module, name)
        if key in self._allowed:
            return self._allowed[key]
        # Never import: a stub class stands in. Instantiating it through NEWOBJ is inert; calling
        # it (REDUCE, as a malicious `os.system` payload does) raises _Refused.
        if key not in self._stubs:
            self._stubs[key] = _stub_class(module, name)
        return self._stubs[key]

    def persistent_load(self, pid):
        if self._persistent is None:
            raise pickle.UnpicklingError("persistent id in a plain pickle")
        return self._persistent(pid)


def safe_load(file, path: str = "<pickle>", **kwargs) -> Any:
    """Unpickle one object from a binary file object, refusing anything off the allow-list."""
    try:
        return RestrictedUnpickler(file, encoding="latin1", **kwargs).load()
    except _Refused as exc:
        raise UnsafePickleError(path, f"refused to unpickle: the file asks to call {exc}, "
                                      "which is not a known tensor or container constructor "
                                      "(nothing was executed)") from None


def safe_loads(data: bytes, path: str = "<pickle>", **kwargs) -> Any:
    return safe_load(io.BytesIO(data), path, **kwargs)

