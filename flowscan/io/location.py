"""Where checkpoints live: a local path, or a URL of any fsspec store (s3://, gs://, hf://, https://).

Readers use the small slice of `pathlib` they need (`/`, `name`, `iterdir`, `is_file`, `open`,
`stat`, ...), so a `RemotePath` stands in for a `Path` and every reader works on every store.
Remote bytes are fetched with range requests: a safetensors header or a zip's directory costs a
few kilobytes, and a tensor's bytes are fetched only when it is reduced. An HTTP server that
ignores `Range` (answers 200 with the whole body, as Python's `http.server` does) is detected
once per host by a one-byte probe; its files are then downloaded whole to a temporary file
(never read at the wrong offset). Credentials come from the store's usual settings (AWS_*
variables, ~/.aws, gcloud, HF_TOKEN, FSSPEC_<PROTOCOL>_<OPTION> variables), never from the
command line. Needs `pip install 'flowscan[remote]'` (fsspec; s3fs, gcsfs or huggingface_hub
for their stores); local paths never import it and keep their memory maps.
"""

from __future__ import annotations

import atexit
import fnmatch
import hashlib
import io
import mmap
import os
import posixpath
import re
import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Union

from flowscan.errors import FlowscanError, ScanError

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
BLOCK_BYTES = 1 << 14          # read-ahead of remote file objects: a header costs a block or two
CACHE_BYTES = 256 << 20        # tensor bytes kept between the reads of one round (weight, mask, CRC)
WHOLE_FILE_BYTES = 1 << 20     # smaller files are fetched whole, once: fewer requests than their headers
# protocol -> (the package fsspec needs for it, what `flowscan formats` calls it; None: not listed)
PROTOCOLS = {"s3": ("s3fs", "S3 and S3-compatible servers"), "gs": ("gcsfs", "Google Cloud Storage"),
             "hf": ("huggingface_hub", "Hugging Face repositories"),
             "https": ("aiohttp", "web servers (Range requests, else whole files)"),
             "s3a": ("s3fs", None), "gcs": ("gcsfs", None), "http": ("aiohttp", None),
             "az": ("adlfs", None), "abfs": ("adlfs", None)}


def store_status() -> dict[str, str]:
    """Each store URL scheme and whether this installation can read it (fsspec + its package)."""
    from flowscan import extras

    def status(package: str) -> str:
        missing = [m for m in ("fsspec", package) if not extras.ready(m)]
        return "ready" if not missing else "needs " + " and ".join(
            f"{m} ({extras.install_hint(m)})" for m in missing)
    return {f"{protocol}://": f"{what}: {status(package)}" for protocol, (package, what) in PROTOCOLS.items() if what}


def is_url(text: object) -> bool:
    m = _URL.match(str(text))
    return bool(m) and m.group(1).lower() != "file"


def location(where: Union[str, os.PathLike, "RemotePath"]) -> Union[Path, "RemotePath"]:
    """A `Path` for local paths (and file:// URLs), a `RemotePath` for any other URL."""
    if isinstance(where, (RemotePath, Path)):   # a Path is local: a URL's "//" does not survive in one
        return where
    text = str(where)
    if text.lower().startswith("file://"):
        return Path(text[7:])
    if is_url(text):
        return RemotePath.from_url(text)
    return Path(where)


def is_remote(path: object) -> bool:
    return isinstance(path, RemotePath)


class ByteCache:
    """Bytes by key, kept up to `limit` bytes in all (the oldest dropped first); thread-safe."""

    def __init__(self, limit: int = CACHE_BYTES):
        self._items: OrderedDict[Any, bytes] = OrderedDict()
        self._held, self._limit, self._lock = 0, limit, threading.Lock()

    def get(self, key) -> bytes | None:
        with self._lock:
            return self._items.get(key)

    def put(self, key, data: bytes) -> bytes:
        with self._lock:
            if key not in self._items:
                self._items[key] = data
                self._held += len(data)
                while self._held > self._limit and len(self._items) > 1:
                    self._held -= len(self._items.popitem(last=False)[1])
        return data

    def drop(self, key) -> None:
        with self._lock:
            data = self._items.pop(key, None)
            self._held -= len(data) if data is not None else 0


class Store:
    """One fsspec filesystem, with what flowscan learned about it: folder listings, whether
    it honours Range, and local copies of files from a store that does not."""

    def __init__(self, fs, protocol: str):
        self.fs, self.protocol = fs, protocol
        self._listings: dict[str, dict[str, dict]] = {}
        self._ranges: dict[str, bool] = {}   # by web server: object stores always honour Range
        self._copies: dict[str, Path] = {}
        self._small = ByteCache()
        self._lock, self._probing = threading.Lock(), threading.Lock()

    def __reduce__(self):  # worker processes get the filesystem, not the caches
        return (Store, (self.fs, self.protocol))

    def listing(self, folder: str) -> dict[str, dict]:
        """Entries of a folder by name (cached: one request per folder per scan)."""
        with self._lock:
            if folder in self._listings:
                return self._listings[folder]
        try:
            entries = self.fs.ls(folder, detail=True)
        except (FileNotFoundError, NotADirectoryError) as exc:
            refused_redirect(exc, folder)
            entries = []
        found = {}
        for entry in entries:
            name = _strip(entry.get("name", ""))
            if name and name != _strip(folder) and posixpath.dirname(name) == _strip(folder):
                found[posixpath.basename(name)] = entry
        with self._lock:
            self._listings[folder] = found
        return found

    def honours_range(self, path: str) -> bool:
        """False for an HTTP server that answers a Range request with the whole file. Asked once
        per server, for one byte past the start: fsspec's file object refuses a 200 answer from
        its headers, before the body is read."""
        if self.protocol not in ("http", "https"):
            return True
        server = "/".join(path.split("/")[:3])
        with self._probing:   # one probe per server, also when worker threads ask at once
            return self._probe(server, path)

    def _probe(self, server: str, path: str) -> bool:
        if server not in self._ranges:
            try:
                with self.fs.open(path, "rb", block_size=1, cache_type="none") as f:
                    f.seek(1)
                    honoured = len(f.read(1)) == 1
            except ValueError:   # "The HTTP server doesn't appear to support range requests"
                honoured = False
            self._ranges[server] = honoured
        return self._ranges[server]

    def whole(self, path: str) -> bytes:
        """A small file's bytes, fetched once (kept for the scan, CACHE_BYTES at most)."""
        data = self._small.get(path)
        return data if data is not None else self._small.put(path, self.fs.cat_file(path))

    def local_tree(self, folder: "RemotePath") -> Path:
        """A whole folder tree, downloaded once (for readers of servers without Range whose
        library reads the store itself: tensorstore for Orbax)."""
        with self._lock:
            if folder.path in self._copies:
                return self._copies[folder.path]
        target = Path(tempfile.mkdtemp(prefix="tree-", dir=_scratch()))
        stack = [(folder, target)]
        while stack:
            remote, local = stack.pop()
            for child in remote.iterdir():
                if child.is_dir():
                    (local / child.name).mkdir()
                    stack.append((child, local / child.name))
                else:
                    self.fs.get_file(child.path, str(local / child.name))
        with self._lock:
            self._copies[folder.path] = target
        return target

    def local_copy(self, path: str) -> Path:
        """The whole file, downloaded once to a temporary folder (for servers without Range)."""
        with self._lock:
            if path in self._copies:
                return self._copies[path]
            target = Path(_scratch()) / f"{len(self._copies)}-{posixpath.basename(path) or 'file'}"
            self.fs.get_file(path, str(target))
            self._copies[path] = target
            return target


_SCRATCH: list[str] = []


def _scratch() -> str:
    if not _SCRATCH:
        _SCRATCH.append(tempfile.mkdtemp(prefix="flowscan-remote-"))
        atexit.register(shutil.rmtree, _SCRATCH[0], True)
    return _SCRATCH[0]


def _strip(path: str) -> str:
    return path.rstrip("/") if path not in ("/", "") else path


_STORES: dict[tuple, Store] = {}


def _store(url: str) -> tuple[Store, str]:
    from flowscan import extras

    fsspec = extras.require("fsspec", f"{url}: reading remote archives")
    protocol = _URL.match(url).group(1).lower()
    options = {"client_kwargs": {"trace_configs": [_redirect_guard(url)]}} if protocol in ("http", "https") else {}
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        package = PROTOCOLS.get(protocol, ("its fsspec implementation", None))[0]
        raise FlowscanError(f"{url}: {protocol}:// needs {package}: {extras.install_hint(package)} ({exc})") from None
    except ValueError as exc:
        raise FlowscanError(f"{url}: {exc}") from None
    key = (protocol, getattr(fs, "_fs_token", id(fs)))
    store = _STORES.setdefault(key, Store(fs, protocol))
    return store, path


class RedirectRefused(OSError):
    """A web server sent a read elsewhere than below the URL given."""


def within(url: str, prefix: str) -> bool:
    """Whether `url` is `prefix` or below it: same scheme, host and port, and a path under its path."""
    from urllib.parse import urlsplit

    a, b = urlsplit(url), urlsplit(prefix)
    try:
        same_server = (a.scheme.lower(), a.hostname, a.port or _PORTS.get(a.scheme.lower())) == \
            (b.scheme.lower(), b.hostname, b.port or _PORTS.get(b.scheme.lower()))
    except ValueError:   # a port that is not a number
        return False
    top = b.path.rstrip("/")
    return same_server and (a.path.rstrip("/") == top or a.path.startswith(top + "/"))


_PORTS = {"http": 80, "https": 443}


def refused_redirect(exc: BaseException, where) -> None:
    """Raise the refused redirect behind `exc` (fsspec reports it as "not found") as this path's error."""
    seen = exc
    while seen is not None:
        if isinstance(seen, RedirectRefused):
            raise ScanError(where, str(seen)) from None
        seen = seen.__cause__ or seen.__context__


def _redirect_guard(prefix: str):
    """An aiohttp trace that stops a redirect leaving `prefix` before it is followed (one that stays
    below it, such as a folder's added slash, is followed). It travels to worker processes with its
    filesystem (pickled as the prefix it guards, and made again there)."""
    import copyreg

    import aiohttp

    async def on_redirect(_session, _context, params) -> None:
        target = str(params.url.join(aiohttp.client.URL(params.response.headers.get("Location", ""))))
        if not within(target, prefix):
            raise RedirectRefused(f"{params.url} redirects to {target}, outside {prefix} (not followed)")

    trace = aiohttp.TraceConfig()
    trace.on_request_redirect.append(on_redirect)
    trace.flowscan_prefix = prefix
    copyreg.pickle(aiohttp.TraceConfig, _reduce_guard)
    return trace


def _reduce_guard(trace):
    prefix = getattr(trace, "flowscan_prefix", None)
    if prefix is None:
        raise TypeError("an aiohttp TraceConfig other than flowscan's redirect guard cannot be pickled")
    return _redirect_guard, (prefix,)


class RemotePath:
    """A file or folder in an fsspec store, with the slice of `pathlib.Path` readers use."""

    __slots__ = ("store", "path", "_entry", "top")

    def __init__(self, store: Store, path: str, entry: dict | None = None, top: str | None = None):
        self.store, self.path, self._entry = store, _strip(path), entry
        # the URL the user gave: nothing above it is ever listed or read
        self.top = _strip(top) if top is not None else self.path

    @classmethod
    def from_url(cls, url: str) -> "RemotePath":
        store, path = _store(url)
        return cls(store, path)

    def __reduce__(self):
        return (RemotePath, (self.store, self.path, self._entry, self.top))

    # -- names ----------------------------------------------------------------------------------
    def __str__(self) -> str:
        if self.store.protocol in ("http", "https"):
            return self.path
        return f"{self.store.protocol}://{self.path.lstrip('/')}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __fspath__(self):  # os-level calls (open(), os.stat) must not see a URL as a local name
        raise TypeError(f"{self} is remote: use its own open()/stat()")

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and (self.store, self.path) == (other.store, other.path)

    def __hash__(self) -> int:
        return hash((id(self.store), self.path))

    def __lt__(self, other: "RemotePath") -> bool:
        return self.path < other.path

    def __truediv__(self, name: str) -> "RemotePath":
        return RemotePath(self.store, f"{self.path}/{str(name).strip('/')}", top=self.top)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> "RemotePath":
        return RemotePath(self.store, posixpath.dirname(self.path), top=self.top)

    def resolve(self) -> "RemotePath":
        return self

    absolute = resolve   # a URL is absolute already

    def relative_to(self, other: "RemotePath") -> PurePosixPath:
        if not isinstance(other, RemotePath) or other.store is not self.store:
            raise ValueError(f"{self} is not below {other}")
        return PurePosixPath(posixpath.relpath(self.path, other.path))

    # -- what is there ---------------------------------------------------------------------------
    def entry(self) -> dict | None:
        """The store's listing entry (type, size, ...), from the parent folder's listing; never for
        the URL given or anything above it (that would list folders the user did not name)."""
        if self._entry is None and not self._is_top() and self._below_top():
            self._entry = self.store.listing(self.parent.path).get(self.name)
        return self._entry

    def _below_top(self) -> bool:
        return self.path.startswith(self.top.rstrip("/") + "/")

    def _within_top(self) -> bool:
        return self.path == self.top or self._below_top()

    def _is_top(self) -> bool:
        """A bucket or a web server's root: nothing above it can be listed."""
        if self.store.protocol in ("http", "https"):
            return self.path.count("/") <= 2
        return "/" not in self.path.strip("/")

    def is_dir(self) -> bool:
        entry = self.entry()
        if entry is None:  # the URL given, a store root, or a folder its parent cannot list (HTTP roots)
            return self._within_top() and bool(self.store.listing(self.path))
        return entry.get("type") == "directory"

    def is_file(self) -> bool:
        entry = self.entry()
        return entry is not None and entry.get("type") == "file"

    def exists(self) -> bool:
        return self.entry() is not None or self.is_dir()

    def iterdir(self) -> Iterator["RemotePath"]:
        if not self._within_top():
            return
        for name, entry in self.store.listing(self.path).items():
            yield RemotePath(self.store, f"{self.path}/{name}", entry, self.top)

    def glob(self, pattern: str) -> Iterator["RemotePath"]:
        return (p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern))

    def stat(self) -> "RemoteStat":
        entry = self.entry()
        if entry is None or entry.get("type") != "file":
            raise FileNotFoundError(2, "no such file", str(self))
        if entry.get("size") is None:  # HTTP listings have no sizes: ask for them once
            try:
                info = self.store.fs.info(self.path)
            except FileNotFoundError as exc:
                refused_redirect(exc, self)
                raise
            entry.update({k: v for k, v in info.items() if k != "type"})
        if entry.get("size") is None:
            raise ScanError(self, "the server does not report this file's size (no Content-Length)")
        stamp = entry.get("ETag") or entry.get("etag") or entry.get("LastModified") or entry.get("mtime") or ""
        # a stable number (str hashes differ between processes, and the cache outlives them)
        return RemoteStat(int(entry["size"]), int(hashlib.sha256(str(stamp).encode()).hexdigest()[:15], 16))

    # -- bytes -----------------------------------------------------------------------------------
    def local(self) -> Path | bytes | None:
        """How this file's bytes are reached: a downloaded copy (the server ignores Range), its
        bytes (small files, fetched whole once), or None (range requests)."""
        if not self.store.honours_range(self.path):
            return self.store.local_copy(self.path)
        if self.stat().st_size <= WHOLE_FILE_BYTES:
            return self.store.whole(self.path)
        return None

    def open(self, mode: str = "rb", newline: str | None = None):
        if mode not in ("rb", "r"):
            raise PermissionError(f"{self}: flowscan never writes to remote archives")
        local = self.local()
        if isinstance(local, Path):
            return open(local, mode, newline=newline)
        f = io.BytesIO(local) if local is not None else self.store.fs.open(
            self.path, "rb", block_size=BLOCK_BYTES, cache_type="readahead", size=self.stat().st_size)
        return io.TextIOWrapper(f, encoding="utf-8", newline=newline) if mode == "r" else f

    def read_bytes(self) -> bytes:
        local = self.local()
        if isinstance(local, Path):
            return local.read_bytes()
        return local if local is not None else self.store.fs.cat_file(self.path)


@dataclass(frozen=True)
class RemoteStat:
    st_size: int
    st_mtime_ns: int


class RemoteBytes:
    """A remote file's bytes by offset, for `StorageFile` (the remote stand-in of a memory map).

    A region is fetched with one range request when a tensor is reduced, kept until released
    (the weight, its mask and its CRC read the same region), and checked to be exactly the
    length asked for."""

    def __init__(self, path: RemotePath):
        self.path, self.size = path, path.stat().st_size
        self._regions = ByteCache()

    def __len__(self) -> int:
        return self.size

    def fetch(self, offset: int, nbytes: int) -> bytes:
        data = self._regions.get((offset, nbytes))
        if data is not None or nbytes == 0:
            return data or b""
        data = self.path.store.fs.cat_file(self.path.path, start=offset, end=offset + nbytes)
        if len(data) != nbytes:
            raise ScanError(self.path, f"the store returned {len(data)} bytes for a range of {nbytes} "
                                       f"at {offset} (file changed while reading?)")
        return self._regions.put((offset, nbytes), data)

    def __getitem__(self, where: slice) -> bytes:
        start, stop, _ = where.indices(self.size)
        return self.fetch(start, max(0, stop - start))

    def forget(self, offset: int, nbytes: int) -> None:
        self._regions.drop((offset, nbytes))


def read_at(f, nbytes: int, offset: int) -> bytes:
    """`nbytes` at `offset` of an open file: pread locally (no shared position), seek+read remotely."""
    if hasattr(f, "fs") and hasattr(f, "path"):   # an fsspec file: exactly these bytes, no read-ahead
        return f.fs.cat_file(f.path, start=offset, end=min(offset + nbytes, f.size))
    try:
        fd = f.fileno()
    except (OSError, AttributeError):   # io.UnsupportedOperation is an OSError
        f.seek(offset)
        return f.read(nbytes)
    return os.pread(fd, nbytes, offset)


def read_ranges(f, ranges: list[tuple[int, int]]) -> list[bytes]:
    """`read_at` for many (offset, nbytes): an fsspec file asks for all of them concurrently."""
    if hasattr(f, "fs") and hasattr(f, "path") and ranges:
        starts = [offset for offset, _ in ranges]
        ends = [min(offset + n, f.size) for offset, n in ranges]
        return f.fs.cat_ranges([f.path] * len(ranges), starts, ends)
    return [read_at(f, n, offset) for offset, n in ranges]


def map_file(path: Union[Path, RemotePath]) -> Any:
    """The file's bytes by offset: a read-only memory map locally, range requests remotely."""
    if isinstance(path, RemotePath):
        local = path.local()
        if local is None:
            return RemoteBytes(path)
        if not isinstance(local, Path):
            return local   # bytes: sliced and viewed like a memory map
        path = local
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    _guard(mm)
    return mm


# A local file that shrinks while it is mapped would kill the process with SIGBUS on the first read
# of a lost page. The compiled kernel guards each map: lost pages read as zeros and the map is marked,
# so the round is that file's named error (`lost_pages`). Without the kernel nothing is guarded.
try:
    from flowscan import _fused as _GUARDS
except ImportError:   # no C compiler at install
    _GUARDS = None
if not hasattr(_GUARDS, "guard"):
    _GUARDS = None
_SLOTS: dict[int, tuple[int, Any]] = {}   # id of a live map -> (its guard slot, the weak reference)


def _guard(mm: mmap.mmap) -> None:
    if _GUARDS is None or len(mm) == 0:
        return
    slot = _GUARDS.guard(mm)
    if slot >= 0:
        key = id(mm)

        def unguard(_ref, key=key, slot=slot):   # maps are closed by being collected, never by hand
            _GUARDS.unguard(slot)
            _SLOTS.pop(key, None)
        _SLOTS[key] = (slot, weakref.ref(mm, unguard))


def lost_pages(mm: Any) -> bool:
    """Whether a map made by `map_file` lost pages to its file shrinking since it was made."""
    entry = _SLOTS.get(id(mm)) if isinstance(mm, mmap.mmap) else None
    return entry is not None and entry[1]() is mm and _GUARDS.guard_hit(entry[0])
