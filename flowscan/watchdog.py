"""Rounds read in watched worker processes, for files a third-party library parses (h5py,
tensorstore, msgpack). One damaged byte can make libhdf5 loop forever while it holds the GIL, so
no thread can interrupt it; a worker process can be killed. Each round gets `read_timeout`
seconds; past that its worker is killed, the round is a named error, and the other rounds go on.
A worker that dies (a crash in the library) costs only its round too.

Workers are kept between analyses (starting one imports numpy and the readers: about a second),
and each reads one round at a time, so the time a round took is exactly its own.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import threading
import time
from multiprocessing.connection import wait

from flowscan.errors import printable
from flowscan.io.budget import BUDGET


def _environment() -> int:
    """What a worker inherits that matters to reading (credentials, settings): its environment."""
    return hash(frozenset(os.environ.items()))


class _Worker:
    def __init__(self):
        ctx = multiprocessing.get_context("spawn")   # fork is unsafe with polars/pyarrow threads
        self.environment = _environment()
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child,), daemon=True, name="flowscan-watched")
        self.process.start()
        child.close()

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


def _serve(conn) -> None:
    _die_with_parent()
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        reduce_task, rnd, names, verify, jobs = job
        BUDGET.share(jobs)   # one of `jobs` workers inflating at once
        conn.send(reduce_task(rnd, names, verify))


def _die_with_parent() -> None:
    """On Linux, a worker stuck in a library loop is killed when the analysis is (else it would spin on)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):   # not Linux: such a worker lives until its read returns
        pass


_idle: list[_Worker] = []
_lock = threading.Lock()


def _take() -> _Worker:
    """An idle worker started with this process's present environment, else a new one."""
    now = _environment()
    with _lock:
        while _idle:
            worker = _idle.pop()
            if worker.process.is_alive() and worker.environment == now:
                return worker
            worker.kill()
    return _Worker()


def _give_back(worker: _Worker) -> None:
    with _lock:
        _idle.append(worker)


@atexit.register
def _stop_idle() -> None:
    with _lock:
        while _idle:
            _idle.pop().kill()


def _where(rnd) -> str:
    return printable(str(rnd.files[0] if rnd.files else "?"))


def map_watched(work, options, progress, reduce_task):
    """(run number, RoundSums or error) per (run number, Round), each round in a watched worker,
    `options.jobs` at a time."""
    timeout = options.read_timeout
    queue, busy = list(work), {}   # worker -> (run number, round, deadline)
    try:
        while queue or busy:
            while queue and len(busy) < max(1, options.jobs):
                i, rnd = queue.pop(0)
                worker = _take()
                worker.conn.send((reduce_task, rnd, options.names, options.verify, max(1, options.jobs)))
                busy[worker] = (i, rnd, time.monotonic() + timeout)
            soonest = min(deadline for _i, _r, deadline in busy.values())
            ready = wait([w.conn for w in busy], timeout=max(0.0, soonest - time.monotonic()))
            for worker in list(busy):
                i, rnd, deadline = busy[worker]
                if worker.conn in ready:
                    try:
                        outcome = worker.conn.recv()
                    except (EOFError, OSError):
                        outcome = None
                    del busy[worker]
                    if outcome is None:
                        worker.kill()
                        outcome = (f"{_where(rnd)}: the process reading this round died (a crash in the library "
                                   "that parses it); the file is probably hostile or corrupt")
                    else:
                        _give_back(worker)
                elif time.monotonic() >= deadline:
                    del busy[worker]
                    worker.kill()
                    outcome = (f"{_where(rnd)}: reading this round did not finish within {timeout:g} s (the "
                               "library parsing it may loop forever on a damaged file; --read-timeout sets the "
                               "limit)")
                else:
                    continue
                yield i, outcome
                if progress:
                    progress(1)
    finally:   # interrupted: the rounds in flight are abandoned with their workers
        for worker in busy:
            worker.kill()
