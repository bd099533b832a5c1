"""numpy .npz archives, one array read at a time (pickled object arrays are refused)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from flowscan.errors import ScanError
from flowscan.io.arrays import LoadedArray


def load(path: Path) -> dict[str, LoadedArray]:
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ScanError(path, f"not a readable .npz archive (truncated or corrupt?): {exc}") from None
    out: dict[str, LoadedArray] = {}
    with zf:
        for member in zf.namelist():
            if not member.endswith(".npy"):
                continue
            with zf.open(member) as f:
                try:
                    version = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _fortran, dtype = read_header(f)
                except ValueError as exc:
                    raise ScanError(path, f"bad array header: {exc}", tensor=member[:-4]) from None
            if dtype.hasobject:
                raise ScanError(path, "object arrays need pickle; refused", tensor=member[:-4])
            out[member[:-4]] = LoadedArray(shape, dtype, _loader(path, member[:-4]))
    return out


def _loader(path: Path, key: str):
    def load_one() -> np.ndarray:
        try:
            with np.load(path, allow_pickle=False) as npz:
                return npz[key]
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
            raise ScanError(path, f"cannot read array: {exc}", tensor=key) from None
    return load_one
