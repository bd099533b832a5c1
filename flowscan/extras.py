"""Optional dependencies: one table of which pip extra brings which package, one way to ask for one.

`require("h5py", "reading Keras .h5 files")` imports and returns the module, or raises a
named error (a ScanError, so a reader's missing package costs only its run) that says what needs it and the `pip install` line to run; `ready("h5py")` tells
whether it is installed, without importing it (for `flowscan formats`). Names here are fixed by
flowscan, never read from the data.
"""

from __future__ import annotations

import importlib
from importlib.util import find_spec
from types import ModuleType

from flowscan.errors import ScanError

# importable module -> the extra that installs it
EXTRAS = {
    "torch": "produce", "sklearn": "produce", "h5py": "keras", "msgpack": "flax", "tensorstore": "orbax",
    "fsspec": "remote", "aiohttp": "remote", "s3fs": "remote", "distributed": "dask",
}
# packages outside every extra: installed by their own name
OWN_PACKAGES = {"gcsfs": "gcsfs", "huggingface_hub": "huggingface_hub", "adlfs": "adlfs"}


def install_hint(module: str) -> str:
    if module in EXTRAS:
        return f"pip install 'flowscan[{EXTRAS[module]}]'"
    return f"pip install {OWN_PACKAGES.get(module, module)}"


def ready(module: str) -> bool:
    """Installed here (found on the path), without importing it."""
    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, purpose: str) -> ModuleType:
    """The module, or a named error: `{purpose} needs {module}: pip install 'flowscan[extra]'`."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ScanError(None, f"{purpose} needs {module}: {install_hint(module)}") from None
