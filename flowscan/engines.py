"""How the map step runs: every round is an independent task, reduced to RoundSums (or an error
message) by `reduce_task(round, names, verify)`; an engine runs the tasks and yields
(run number, outcome) as they complete.

- `threads` (the default): a thread pool in this process. The chunk reductions (the compiled
  kernel, or numpy on 1 MiB buffers) release the GIL, so threads scale with the cores without
  spawning or pickling anything; memory stays one chunk buffer per thread.
- `processes`: a process pool, for isolation: a worker that dies (a crash, the out-of-memory
  killer) costs only its own round.
- `dask`: a dask.distributed cluster (`scheduler` = its address, or a local cluster of `jobs`
  worker processes). Workers read the files themselves, so the paths must mean the same on
  them (a shared file system). The per-round cache is read and written by this process alone
  (pipeline.py), so it needs no shared folder. Optional: `pip install 'flowscan[dask]'`.

With one job (or one task) every engine reduces in the calling thread.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

from flowscan import extras, watchdog
from flowscan.errors import FlowscanError, printable
from flowscan.io.budget import BUDGET
from flowscan.io.location import is_remote

ENGINES = ("threads", "processes", "dask")
CONNECT_TIMEOUT = "30s"   # to reach a dask scheduler
# `auto`: small checkpoints are Python-bound (zip directory, pickle, bookkeeping) and threads fight
# over the GIL (5,000 files of 60 KB: 14 s with two threads, 10 s with one, 8 s with two processes);
# large ones are numpy-bound and threads scale. Processes from this many rounds of this mean size.
AUTO_PROCESSES_ROUNDS = 200
AUTO_PROCESSES_MEAN_BYTES = 4 << 20
MAX_BATCH = 32   # rounds handed to a worker process at a time
# While reduction threads run, the GIL changes hands every millisecond instead of Python's 5: a thread
# back from the kernel waits less for one that runs Python (reading headers, bookkeeping). A scan of
# 8 ResNet-50 rounds in bfloat16 at -j2: median 0.18 -> 0.15 s.
GIL_TURN_SECONDS = 0.001


def choose(rounds, jobs: int) -> tuple[str, str]:
    """(engine, why) for `--engine auto`: processes for many small local checkpoints, else threads."""
    rounds = list(rounds)
    if jobs <= 1 or len(rounds) < AUTO_PROCESSES_ROUNDS or not all(isinstance(f, Path) for r in rounds for f in r.files):
        return "threads", "threads"
    sample = rounds[:: max(1, len(rounds) // 50)]
    try:
        mean = sum(f.stat().st_size for r in sample for f in r.files) / max(1, sum(len(r.files) for r in sample))
    except OSError:
        return "threads", "threads"
    if mean < AUTO_PROCESSES_MEAN_BYTES:
        return "processes", (f"processes ({len(rounds)} rounds of {mean / 1e3:.0f} kB on average: reading small "
                             "files is Python-bound, where threads contend for the GIL)")
    return "threads", "threads"


# A process pool started while discovery still runs (`foresee`), taken by the first pass of the
# processes engine: spawning the workers and importing flowscan in them (0.2 s on 2 cores) then
# overlaps the discovery instead of following it.
_early: tuple[int, ProcessPoolExecutor] | None = None   # (workers, pool)


def foresee(rounds_found: int, rounds, options) -> bool:
    """Called by discovery as rounds are found: start the process pool now when the rounds will go to
    processes (`--engine processes`, or `auto` once its rule holds for the first rounds found; it
    decides again on all of them, and a pool not wanted then is closed unused). True once settled:
    discovery need not ask again."""
    global _early
    if _early is not None or options.jobs <= 1 or _in_a_daemon() or options.engine not in ("processes", "auto"):
        return True
    if options.engine == "auto" and rounds_found < AUTO_PROCESSES_ROUNDS:
        return False
    if options.engine == "processes" or choose(rounds, options.jobs)[0] == "processes":
        pool = ProcessPoolExecutor(max_workers=options.jobs, mp_context=multiprocessing.get_context("spawn"))
        for _ in range(options.jobs):   # a worker is spawned per task submitted, up to max_workers
            pool.submit(_warm_worker)
        _early = (options.jobs, pool)
    return True


def _warm_worker() -> None:
    from flowscan import pipeline  # noqa: F401 - what every task unpickles
    from flowscan.readers import registry

    registry.all_readers()


def _early_pool(jobs: int) -> ProcessPoolExecutor | None:
    """The pool `foresee` started, when it has `jobs` workers (one of another size is closed)."""
    global _early
    if _early is not None and _early[0] == jobs:
        pool, _early = _early[1], None
        return pool
    discard_early_pool()
    return None


def discard_early_pool() -> None:
    global _early
    started, _early = _early, None
    if started is not None:
        started[1].shutdown(wait=False, cancel_futures=True)


def default_jobs() -> int:
    """The cores this process may run on."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def map_rounds(tasks, options, progress: Callable[[int], None] | None, reduce_task) -> Iterator[tuple[int, object]]:
    """(run number, RoundSums or error message) per (run number, Round) task, as they complete."""
    work = list(tasks)
    if options.engine not in ENGINES:
        raise FlowscanError(f"unknown engine {options.engine!r}; known: {', '.join(ENGINES)}")
    if options.engine != "processes" or options.jobs <= 1 or len(work) <= 1:
        discard_early_pool()
    if options.engine == "dask":
        yield from _dask(work, options, progress, reduce_task)
        return
    # (a daemonic process may not start workers: there the rounds are read as the engine reads any)
    if not _in_a_daemon():
        split = {True: [], False: []}
        for task in work:
            split[_parsed_by_a_library(task[1])].append(task)
        if split[True]:
            yield from watchdog.map_watched(split[True], options, progress, reduce_task)
        work = split[False]
    if options.jobs <= 1 or len(work) <= 1:
        for i, rnd in work:
            yield i, reduce_task(rnd, options.names, options.verify)
            _step(progress)
        return
    if options.engine == "threads":
        yield from _threads(work, options, progress, reduce_task)
    else:
        yield from _processes(work, options, progress, reduce_task)


def in_this_process(rnd) -> bool:
    """Whether the threads engine reduces this round here (a local file flowscan parses itself), rather
    than a watched worker process or a remote store."""
    return not _parsed_by_a_library(rnd) and not any(map(is_remote, rnd.files))


def _parsed_by_a_library(rnd) -> bool:
    """Rounds whose files a third-party library parses (h5py, tensorstore, msgpack): a damaged file can
    make it loop forever, holding the GIL, or crash, so they are read in watched processes."""
    from flowscan.readers import registry

    try:
        needs = registry.get(rnd.reader).needs
    except FlowscanError:   # not a reader's round (a task of another kind)
        return False
    # without its library the round fails at once with the install line: no worker for that. Remote
    # rounds stay here: a worker would fetch their bytes again, its store's caches being its own
    return bool(needs) and all(extras.ready(module) for module in needs) and not any(map(is_remote, rnd.files))


def _in_a_daemon() -> bool:
    return bool(multiprocessing.current_process().daemon)


def _step(progress) -> None:
    if progress:
        progress(1)


@contextlib.contextmanager
def _short_gil_turns():
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, GIL_TURN_SECONDS))
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def _threads(work, options, progress, reduce_task):
    with _short_gil_turns(), \
            ThreadPoolExecutor(max_workers=min(options.jobs, len(work)), thread_name_prefix="flowscan") as pool:
        futures = {pool.submit(reduce_task, rnd, options.names, options.verify): i
                   for i, rnd in work}
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()   # reduce_task turns errors into messages
                _step(progress)
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _processes(work, options, progress, reduce_task):
    """Rounds go to the workers in batches (for small checkpoints the hand-over costs as much as the
    reduction). A dead worker breaks the pool for every round in it; those rounds are retried, the
    ones the dead worker could have held one at a time, so the death is pinned on its own round."""
    # spawn, not fork: polars/pyarrow threads make fork unsafe.
    ctx = multiprocessing.get_context("spawn")
    batch = max(1, min(MAX_BATCH, len(work) // (options.jobs * 8)))
    while work:
        unfinished = yield from _pool_pass(work, options, options.jobs, ctx, progress, reduce_task, batch)
        # the pool hands work out in order: a dead worker held one of the first jobs + 1 batches
        suspects, work = unfinished[:(options.jobs + 1) * batch], unfinished[(options.jobs + 1) * batch:]
        if batch > 1 and suspects:   # narrow them down with one round a task before one at a time
            lost = yield from _pool_pass(suspects, options, options.jobs, ctx, progress, reduce_task, 1)
            suspects, work = lost[:options.jobs + 1], lost[options.jobs + 1:] + work
        for i, rnd in suspects:
            if (yield from _pool_pass([(i, rnd)], options, 1, ctx, progress, reduce_task, 1)):
                yield i, (f"{_where(rnd)}: the process reading this round died (a crash or out of memory); "
                          "the file is probably hostile or corrupt")
                _step(progress)


def _where(rnd) -> str:
    return printable(str(rnd.files[0] if rnd.files else "?"))


def _reduce_batch(reduce_task, rounds, names, verify, jobs: int = 1) -> list:
    BUDGET.share(jobs)   # this worker is one of `jobs` processes inflating at once
    return [reduce_task(rnd, names, verify) for rnd in rounds]


def _pool_pass(work, options, jobs: int, ctx, progress, reduce_task, batch: int):
    """Reduce `work` in a process pool, `batch` rounds a task, yielding outcomes; returns the
    rounds a broken pool lost."""
    lost = []
    with _early_pool(jobs) or ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        # workers get only what they need: block rules hold unpicklable preset functions
        futures = {pool.submit(_reduce_batch, reduce_task, [rnd for _i, rnd in work[k:k + batch]],
                               options.names, options.verify, jobs): k
                   for k in range(0, len(work), batch)}
        try:
            for future in as_completed(futures):
                k = futures[future]
                try:
                    outcomes = future.result()
                except BrokenProcessPool:
                    lost.extend(range(k, min(k + batch, len(work))))
                    continue
                for (i, _rnd), outcome in zip(work[k:k + batch], outcomes):
                    yield i, outcome
                    _step(progress)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return [work[k] for k in sorted(lost)]


def _absolute(rnd):
    """The round with absolute paths (files, and the paths a reader keeps in its spec); store URLs
    are absolute already, so remote archives need no shared file system."""
    def absolute(value):
        return value.resolve() if isinstance(value, Path) else value
    return replace(rnd, files=tuple(f.resolve() for f in rnd.files),
                   spec=tuple(absolute(v) for v in rnd.spec))


def _dask(work, options, progress, reduce_task):
    distributed = extras.require("distributed", "--engine dask")
    Client, LocalCluster, dask_completed = distributed.Client, distributed.LocalCluster, distributed.as_completed
    if not work:
        return
    remote = options.scheduler is not None
    # a remote worker has another working folder: it gets absolute paths (messages keep the user's)
    with contextlib.ExitStack() as stack:
        if remote:
            try:
                client = stack.enter_context(Client(options.scheduler, timeout=CONNECT_TIMEOUT))
            except (OSError, TimeoutError) as exc:
                raise FlowscanError(f"--scheduler {options.scheduler}: cannot connect ({exc})") from None
        else:
            cluster = stack.enter_context(LocalCluster(n_workers=max(1, options.jobs), threads_per_worker=1,
                                                       processes=True, dashboard_address=None))
            client = stack.enter_context(Client(cluster))
        rounds = [_absolute(rnd) if remote else rnd for _i, rnd in work]
        futures = client.map(reduce_task, rounds, names=options.names, verify=options.verify, pure=False)
        index = {f.key: k for k, f in enumerate(futures)}
        try:
            for future in dask_completed(futures):
                k = index[future.key]
                try:
                    outcome = future.result()
                except Exception as exc:  # noqa: BLE001 - a worker lost (KilledWorker, ...) costs its round
                    outcome = f"{_where(work[k][1])}: the dask worker reading this round failed: " \
                              f"{type(exc).__name__}: {exc}"
                yield work[k][0], outcome
                _step(progress)
        except BaseException:
            client.cancel(futures)
            raise
