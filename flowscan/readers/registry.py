"""Reader plugins by name, in the order auto-detection tries them."""

from __future__ import annotations

from flowscan.errors import FlowscanError
from flowscan.readers.base import Reader

_READERS: dict[str, Reader] = {}
_BUILTIN_LOADED = False


def register(reader_cls: type[Reader]) -> type[Reader]:
    _READERS[reader_cls.name] = reader_cls()
    return reader_cls


def _load_builtin() -> None:
    # Import order is detection order: the most specific layouts first. (A reader module imported
    # earlier by itself has registered already; the order of the others stays.)
    global _BUILTIN_LOADED
    from flowscan.readers import flowscan_layout, open_lth, bert_tickets, prune_style  # noqa: F401
    from flowscan.readers import safetensors_dir, flax_msgpack, orbax, keras_h5  # noqa: F401
    _BUILTIN_LOADED = True


def all_readers() -> list[Reader]:
    if not _BUILTIN_LOADED:
        _load_builtin()
    return list(_READERS.values())


def get(name: str) -> Reader:
    readers = {r.name: r for r in all_readers()}
    if name not in readers:
        raise FlowscanError(f"unknown format {name!r}; known: {', '.join(readers)}")
    return readers[name]


def names() -> list[str]:
    return [r.name for r in all_readers()]
