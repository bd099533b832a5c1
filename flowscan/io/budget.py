"""One memory budget for everything an analysis inflates into memory at once.

Some bytes cannot be read in place: a compressed `.keras` weights member (h5py needs the whole file),
a compressed Fortran-order `.npz` member, a band of compressed HDF5 or zarr chunks. A small file can
declare gigabytes of them, and the weight and mask of a tensor, and the rounds read in parallel,
would each inflate their own. So every such allocation takes its bytes from one budget per
process, half of this machine's memory divided among the processes reading at once: a request
larger than the whole budget is refused by name at once, and one that does not fit beside the others
waits for them (up to WAIT_SECONDS, then it is refused by name too, so nothing waits forever).
Compressed C-order `.npz` members need no budget: they are streamed (io/npz_file.py).
"""

from __future__ import annotations

import os
import threading
import weakref

from flowscan.errors import ScanError

WAIT_SECONDS = 120.0


def machine_half() -> int:
    """Half of this machine's memory."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 << 30


class Budget:
    def __init__(self, total: int):
        self.total, self.held = total, 0
        self._free = threading.Condition()

    def share(self, processes: int) -> None:
        """This process is one of `processes` reading at once: it takes its part of the machine's half."""
        self.total = machine_half() // max(1, processes)

    def take(self, nbytes: int, path, what: str, tensor: str | None = None,
             wait: float | None = None) -> "Reservation":
        wait = WAIT_SECONDS if wait is None else wait
        if nbytes > self.total:
            raise ScanError(path, f"{what} needs {nbytes:,} bytes in memory at once, more than flowscan's "
                                  f"budget of {self.total:,} (half of this machine's memory, shared by the "
                                  "rounds read at once; refused)", tensor=tensor)
        with self._free:
            if not self._free.wait_for(lambda: self.held + nbytes <= self.total, timeout=wait):
                raise ScanError(path, f"{what} needs {nbytes:,} bytes in memory while other reads hold "
                                      f"{self.held:,} of the {self.total:,}-byte budget (waited {wait:g} s; "
                                      "read with fewer --jobs)", tensor=tensor)
            self.held += nbytes
        return Reservation(self, nbytes)

    def _give(self, nbytes: int) -> None:
        with self._free:
            self.held -= nbytes
            self._free.notify_all()


class Reservation:
    """Bytes taken from the budget; given back once (`release`, or when `tie` owner is collected)."""

    __slots__ = ("_budget", "_nbytes", "__weakref__")

    def __init__(self, budget: Budget, nbytes: int):
        self._budget, self._nbytes = budget, nbytes

    def release(self) -> None:
        nbytes, self._nbytes = self._nbytes, 0
        if nbytes:
            self._budget._give(nbytes)

    def tie(self, owner) -> None:
        """Give the bytes back when `owner` (what holds them) is collected."""
        weakref.finalize(owner, self.release)


BUDGET = Budget(machine_half())
