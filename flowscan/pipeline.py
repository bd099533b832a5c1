"""analyze: discover runs -> reduce rounds (cached, optionally in parallel) -> flow math per run.

This module only orchestrates; reading is in `readers/`, sums in `reduce`, math in `flow`,
tables in `tables`. A run that fails is reported and the others go on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from flowscan import __version__, engines, flow
from flowscan.blocks import OTHER, BlockRules
from flowscan.errors import FlowscanError, ScanError, printable
from flowscan.io import round_cache
from flowscan.io.location import location
from flowscan.readers import registry
from flowscan.readers.base import NameOptions, Round, Run
from flowscan.readers.discover import discover
from flowscan.reduce import (BITS, RoundSums, TensorSums, dtype_kind, merge_parts, open_tensors, reduce_round,
                             survival_counts)

CACHE_VERSION = 5


@dataclass(frozen=True)
class Options:
    blocks: BlockRules = BlockRules()
    names: NameOptions = NameOptions()
    format: str | None = None
    infer_masks: bool = False     # infer masks from zeros even where other tensors carry masks
    jobs: int = 1
    engine: str = "threads"       # how rounds are reduced in parallel: threads, processes, dask
    scheduler: str | None = None  # a dask scheduler's address (engine dask)
    strict: bool = False
    cache_dir: Path | None = None  # per-round sums, so an interrupted analysis resumes
    # CRC-32 of zip members, checked as they are reduced, while their bytes are in cache: on by
    # default, as python-isal's CRC-32 costs about 10 % of the warm throughput of torch zip archives
    # (zlib's halved it; benchmarks/bench_scan.py)
    verify: bool = True
    # seconds a round read through a third-party library (h5py, tensorstore, msgpack) may take
    # before its worker is killed and the round is a named error (flowscan/watchdog.py)
    read_timeout: float = 600.0

    def identity(self) -> dict[str, str]:
        """The options that change the scan tables (not how fast they are made)."""
        return {"blocks": str(self.blocks), "format": self.format or "", "infer_masks": str(self.infer_masks),
                "select": self.names.select or "", "strip_model_prefix": str(self.names.strip_model_prefix)}


@dataclass
class RunResult:
    run: Run
    error: str | None = None
    tensors: list[str] = field(default_factory=list)   # prunable, in model order
    labels: list[str] = field(default_factory=list)    # block of each tensor
    blocks: list[str] = field(default_factory=list)    # in order of first appearance
    blocks_rule: str = ""
    mask_source: str = ""                               # "stored", "inferred" or "stored+inferred"
    flow: flow.Flow | None = None
    eigen: dict[str, flow.Eigen] = field(default_factory=dict)
    metrics: list[tuple[int, str, float]] = field(default_factory=list)
    survival: np.ndarray | None = None    # steps x blocks x (kept before, kept in both, kept after)
    warnings: list[str] = field(default_factory=list)   # e.g. block rules that match nothing, gaps
    never_pruned: list[str] = field(default_factory=list)  # prunable tensors whose mask is all ones throughout
    sizes: list[int] = field(default_factory=list)          # entries of each prunable tensor

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def n_prunable_params(self) -> int:
        return int(self.flow.n_params.sum()) if self.flow is not None else 0


def find_runs(root: Path, options: Options = Options(), exclude: Path | None = None) -> list[Run]:
    seen_runs, seen_rounds, settled = 0, 0, False

    def found(runs: list[Run]) -> None:   # the process pool may start while discovery goes on
        nonlocal seen_runs, seen_rounds, settled
        if settled:
            return
        seen_rounds += sum(len(run.rounds) for run in runs[seen_runs:] if not run.error)
        seen_runs = len(runs)
        settled = engines.foresee(seen_rounds, (r for run in runs if not run.error for r in run.rounds), options)

    runs = discover(location(root), options.format, exclude, found)
    if not runs:
        raise FlowscanError(no_runs_message(root, options.format))
    return runs


def no_runs_message(root, fmt: str | None = None) -> str:
    """The one message for a folder without IMP runs, whichever command was given it."""
    formats = fmt or ", ".join(registry.names())
    return (f"{root}: no IMP runs found; {describe_folder(location(root))} (looked for: {formats}). "
            "`flowscan formats` lists the layouts flowscan reads.")


def describe_folder(root, limit: int = 10_000) -> str:
    """What a folder holds, for a user told that no run is in it: file kinds and counts."""
    kinds: dict[str, int] = {}
    folders, seen, stack = 0, 0, [root]
    while stack and seen < limit:
        for child in stack.pop().iterdir():
            seen += 1
            if child.is_dir():
                folders += 1
                stack.append(child)
            else:
                parts = child.name.lower().split(".")[1:]
                kind = "." + ".".join(parts[-2:] if parts[-1:] == ["tar"] else parts[-1:]) if parts else "(no extension)"
                kinds[kind] = kinds.get(kind, 0) + 1
    if not kinds and not folders:
        return "it is empty"
    top = sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{n} {kind}" for kind, n in top[:6]) + (", ..." if len(top) > 6 else "")
    return (f"it holds {sum(kinds.values())} file(s) ({shown or 'none'}) in {folders} subfolder(s)"
            + (" (first 10,000 entries)" if seen >= limit else ""))


def analyze(root: Path, options: Options = Options(), exclude: Path | None = None) -> list[RunResult]:
    """Every run below `root`, analysed (the Python entry point of `flowscan analyze`)."""
    return analyze_runs(find_runs(root, options, exclude), options)


@dataclass(frozen=True)
class RoundError:
    """Why one round could not be reduced; `truncated`: its file ends early (a partial copy or a file
    still being written), which for the last round of a run means an incomplete round."""

    message: str
    truncated: bool = False

    def __str__(self) -> str:
        return self.message


def resolve_engine(runs: list[Run], options: Options) -> tuple[Options, str | None]:
    """The options with `--engine auto` decided for these runs (`engines.choose`), and why (None when
    the engine was given)."""
    if options.engine != "auto":
        return options, None
    engine, why = engines.choose((r for run in runs if not run.error for r in run.rounds), options.jobs)
    return replace(options, engine=engine), why


def analyze_runs(runs: list[Run], options: Options,
                 progress: Callable[[int], None] | None = None) -> list[RunResult]:
    """Every run reduced and assembled; whatever fails in one run (reading, survival, flow math,
    assembly) becomes that run's named error and the others are still analysed."""
    options, _why = resolve_engine(runs, options)
    if options.strict:
        failed = next((r for r in runs if r.error), None)
        if failed:
            raise ScanError(None, failed.error)
    tasks = [((i, rnd.index), rnd) for i, run in enumerate(runs) if not run.error for rnd in run.rounds]
    results = {i: RunResult(run, error=run.error) for i, run in enumerate(runs) if run.error}
    pending = {i: len(run.rounds) for i, run in enumerate(runs) if not run.error}
    sums: dict[int, dict[int, RoundSums]] = {i: {} for i in pending}
    steps: dict[int, dict[int, dict]] = {i: {} for i in pending}   # survival counts per step
    errors: dict[int, dict[int, RoundError]] = {i: {} for i in pending}
    successors: dict[int, dict[int, int]] = {}
    for (i, index), outcome in _reduce_all(tasks, options, progress):
        if isinstance(outcome, RoundSums):
            sums[i][outcome.index] = outcome
        else:
            error = outcome if isinstance(outcome, RoundError) else RoundError(str(outcome))
            if options.strict:
                raise ScanError(None, error.message)
            errors[i][index] = error
        pending[i] -= 1
        if isinstance(outcome, RoundSums):
            try:
                if i not in successors:
                    successors[i] = _successors(runs[i])
                _count_survival(runs[i], sums[i], steps[i], index, successors[i])
            except Exception as exc:  # noqa: BLE001 - costs only this run
                errors[i][index] = RoundError(_named(runs[i], "survival", exc))
        if pending[i] == 0:  # the run is complete: assemble it and let its sums go
            successors.pop(i, None)
            results[i] = _finish(runs[i], sums.pop(i), steps.pop(i), errors[i], options)
    return [results[i] for i in range(len(runs))]


def _named(run: Run, stage: str, exc: Exception) -> str:
    """A run's failure in a stage after reading, as a message that names the run and the stage."""
    if isinstance(exc, ScanError):
        return str(exc)
    return printable(f"{run.path}: {stage} failed: {type(exc).__name__}: {exc}")


def _successors(run: Run) -> dict[int, int]:
    """Round -> the next round of the run (across a gap too: that step spans several rounds)."""
    indices = sorted(r.index for r in run.rounds)
    return dict(zip(indices, indices[1:]))


def _count_survival(run: Run, sums: dict[int, RoundSums], steps: dict[int, dict], index: int,
                    after_of: dict[int, int] | None = None) -> None:
    """Count survival for the steps `index` completes, then drop mask bits no step still needs,
    so at most a few rounds' bits are held whatever the number of rounds. `after_of`: the run's
    `_successors`, when the caller keeps them."""
    after_of = _successors(run) if after_of is None else after_of
    before_of = {b: a for a, b in after_of.items()}
    for a in (before_of.get(index), index):
        b = after_of.get(a) if a is not None else None
        if a in sums and b in sums and a not in steps:
            before, after = sums[a], sums[b]
            steps[a] = {}
            for name, t in after.tensors.items():
                if name in before.tensors:
                    same_tensor(name, (a, before.tensors[name]), (b, t))
                    steps[a][name] = survival_counts(before.bits.get(name), after.bits.get(name), t.n_params,
                                                     before.tensors[name].kept, t.kept)
    for r in (before_of.get(index), index, after_of.get(index)):
        done = (before_of.get(r) is None or before_of[r] in steps) and (after_of.get(r) is None or r in steps)
        if r in sums and done and sums[r].bits:
            dropped, sums[r] = sums[r].bits, replace(sums[r], bits={})
            BITS.give_back(dropped)


def same_tensor(name: str, first: tuple[int, Any], later: tuple[int, Any]) -> None:
    """A tensor keeps its shape and its dtype kind (float, int, ...) in every round of a run; a change
    is a named error naming the tensor and both rounds. `first`/`later`: (round, anything with
    .shape, .kind and .path)."""
    (r0, t0), (r1, t1) = first, later
    if tuple(t0.shape) != tuple(t1.shape):
        raise ScanError(t1.path, f"shape changes between rounds: {tuple(t0.shape)} in round {r0} ({t0.path}), "
                                 f"{tuple(t1.shape)} in round {r1}", tensor=name)
    if t0.kind != t1.kind:
        kinds = {"f": "floating point", "i": "integer", "u": "unsigned integer", "b": "bool", "c": "complex"}
        raise ScanError(t1.path, f"dtype kind changes between rounds: {kinds.get(t0.kind, t0.kind)} in round "
                                 f"{r0} ({t0.path}), {kinds.get(t1.kind, t1.kind)} in round {r1}", tensor=name)


def _finish(run: Run, sums: dict[int, RoundSums], steps: dict[int, dict], errors: dict[int, RoundError],
            options: Options) -> RunResult:
    for rs in sums.values():  # what reading noticed (e.g. calls kept as inert records)
        run.notes.extend(n for n in rs.notes if n not in run.notes)
    last = max(r.index for r in run.rounds)
    if set(errors) == {last} and errors[last].truncated and len(run.rounds) > 1:
        # the last round ends early: still being written, or copied partly; the rest is analysed
        run.drop_unfinished(last, errors[last].message)
        errors = {}
    if errors:
        return RunResult(run, error=errors[min(errors)].message)
    try:
        n_rounds = len(run.rounds)
        _drop_partial_last_round(run, sums)
        steps.pop(run.rounds[-1].index, None)   # the last round has no step after it
        if len(run.rounds) != n_rounds:   # a round was dropped: steps whose successor changed
            after_of = _successors(run)
            for rnd in run.rounds:
                _count_survival(run, sums, steps, rnd.index, after_of)
        return assemble(run, [sums[r.index] for r in run.rounds], options, steps)
    except Exception as exc:  # noqa: BLE001 - flow math, eigen, blocks: costs only this run
        if options.strict:
            raise
        return RunResult(run, error=_named(run, "assembly", exc))


def _drop_partial_last_round(run: Run, sums: dict[int, RoundSums]) -> None:
    """A last round without some tensor that carries a mask in the rounds before it is still being
    written (file-per-round layouts: a complete round holds every prunable tensor)."""
    if len(run.rounds) < 2:
        return
    last = run.rounds[-1].index
    earlier = {n for r in run.rounds[:-1] for n, t in sums[r.index].tensors.items() if t.masked}
    absent = sorted(earlier - set(sums[last].tensors))
    if absent:
        run.drop_unfinished(last, f"{run.rounds[-1].files[0] if run.rounds[-1].files else '?'}: lacks "
                                  f"{len(absent)} prunable tensor(s) of the earlier rounds, e.g. {absent[0]!r}")


def _reduce_all(tasks, options: Options, progress, reduce_task=None):
    """(task key, RoundSums or error) per task, as they complete (see engines.py). Rounds whose
    files are unchanged since a cached reduction come from the cache; the others are reduced by
    the engine and appended to the cache here, in this process, as each arrives."""
    reduce_task = reduce_task or _reduce_task
    if options.cache_dir is None:
        yield from _in_parts(tasks, options, progress, reduce_task)
        return
    with round_cache.RoundCache(options.cache_dir) as cache:
        todo, keys = [], {}
        for task_key, rnd in tasks:
            try:
                keys[task_key] = _cache_key(rnd, options.names, options.verify)
            except Exception:  # noqa: BLE001 - unreadable now (a file, a store): the reduction names it
                keys[task_key] = None
            hit = cache.get(keys[task_key]) if keys[task_key] else None
            if hit is None:
                todo.append((task_key, rnd))
                continue
            yield task_key, hit
            if progress:
                progress(1)
        for task_key, outcome in _in_parts(todo, options, progress, reduce_task):
            if isinstance(outcome, RoundSums) and keys[task_key]:
                cache.put(keys[task_key], outcome)
            yield task_key, outcome


# When a scan has fewer than this many rounds per job, its local rounds of at least twice PART_BYTES
# are reduced in parts by several threads at once. With more rounds each part's second reading of the
# file's index costs more than the idle cores at the end: 8 ResNet-50 rounds at -j2 took 8 % longer
# in parts, 3 rounds 15 % less.
ROUNDS_PER_JOB = 4
PART_BYTES = 32 << 20


def _in_parts(tasks, options: Options, progress, reduce_task):
    """engines.map_rounds, with large rounds cut into parts that threads reduce side by side and merged
    back as they complete, when there are too few rounds to keep every core busy (a round is
    otherwise one thread's work: a few large sharded rounds would leave cores idle)."""
    tasks = list(tasks)
    wanted = -(-ROUNDS_PER_JOB * options.jobs // max(1, len(tasks)))   # parts a round to fill the jobs
    parts = {key: _parts(rnd, options, wanted) for key, rnd in tasks}
    if all(n == 1 for n in parts.values()):
        yield from engines.map_rounds(tasks, options, progress, reduce_task)
        return
    work = [((key, k), replace(rnd, part=(k, parts[key]))) for key, rnd in tasks for k in range(parts[key])]
    arrived: dict = {}
    for (key, k), outcome in engines.map_rounds(work, options, None, reduce_task):
        arrived.setdefault(key, {})[k] = outcome
        if len(arrived[key]) == parts[key]:
            done = arrived.pop(key)
            yield key, merge_parts([done[k] for k in range(parts[key])])
            if progress:
                progress(1)


def _parts(rnd: Round, options: Options, wanted: int) -> int:
    """How many parts threads reduce this round in: `wanted`, but at most one per PART_BYTES and one per
    job."""
    if wanted <= 1 or options.engine != "threads" or options.jobs <= 1 or not engines.in_this_process(rnd):
        return 1
    try:
        size = sum(f.stat().st_size for f in rnd.files)
    except (OSError, AttributeError):   # unreadable now: the reduction names it
        return 1
    return max(1, min(wanted, options.jobs, size // PART_BYTES))


def _reduce_task(rnd: Round, names: NameOptions, verify: bool = True) -> RoundSums | RoundError:
    """Reduce one round; errors come back as values, so one unreadable round stops nothing else."""
    try:
        return reduce_round(rnd, names, verify)
    except ScanError as exc:
        return RoundError(str(exc), exc.truncated)
    except Exception as exc:  # noqa: BLE001 - one unreadable round must not stop the other runs
        where = rnd.files[0] if rnd.files else "?"
        return RoundError(printable(f"{where}: {type(exc).__name__}: {exc}"))


def _cache_key(rnd: Round, names: NameOptions, verify: bool) -> str:
    """Identifies a round's reduction: its files (path, size, modification time), how it is read,
    and this version of flowscan."""
    files = []
    for f in rnd.files:
        st = f.stat()
        files.append([str(f.absolute()), st.st_size, st.st_mtime_ns])
    payload = json.dumps([CACHE_VERSION, __version__, rnd.reader, rnd.index, files,
                          [str(s) for s in rnd.spec], vars(names), verify], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def prunable_set(run: Run, rounds: list[dict], infer_masks: bool) -> tuple[list[str], set[str]]:
    """(prunable tensors in model order, those whose masks are inferred from zeros), docs/definitions.md.

    `rounds` maps tensor names to anything with .shape, .kind, .masked and .path, per round in order.
    The prunable set is every tensor with a stored mask in some round; with no mask anywhere in
    the run (or when asked), 2+-dimensional tensors without one get masks from their zeros.
    """
    first: dict[str, tuple[int, Any]] = {}
    masked: set[str] = set()
    for rnd, tensors in zip(run.rounds, rounds):
        for name, t in tensors.items():
            if name not in first:
                first[name] = (rnd.index, t)
            else:
                same_tensor(name, first[name], (rnd.index, t))
            if t.masked:
                masked.add(name)
    infer = infer_masks or not masked
    inferred = {n for n, (_r, t) in first.items() if infer and n not in masked and len(t.shape) >= 2}
    prunable = [n for n in first if n in masked or n in inferred]
    if not prunable:
        raise ScanError(run.path, "no prunable tensors: no masks stored and no tensors of 2+ dimensions")
    return prunable, inferred


def mask_source(prunable: list[str], inferred: set[str]) -> str:
    if not inferred:
        return "stored"
    return "inferred" if len(inferred) == len(prunable) else "stored+inferred"


def assemble(run: Run, rounds: list[RoundSums], options: Options,
             survival_steps: dict[int, dict]) -> RunResult:
    """Prunable set, blocks and flow of one run from its per-round sums (docs/definitions.md);
    `survival_steps` maps round n to per-tensor survival counts n -> n+1."""
    prunable, inferred = prunable_set(run, [rs.tensors for rs in rounds], options.infer_masks)
    shapes = {n: t.shape for rs in rounds for n, t in rs.tensors.items()}
    n_unpruned = np.zeros((len(rounds), len(prunable)), dtype=np.int64)
    abs_sum = np.zeros((len(rounds), len(prunable)), dtype=np.float64)
    for r, rs in enumerate(rounds):
        for j, name in enumerate(prunable):
            t: TensorSums | None = rs.tensors.get(name)
            if t is None:
                raise ScanError(run.rounds[r].files[0], f"prunable tensor missing from round {rs.index}",
                                tensor=name)
            # no stored mask in this round: dense, unless masks are inferred for it
            n_unpruned[r, j] = t.n_nonzero if name in inferred else t.n_unpruned
            abs_sum[r, j] = t.abs_sum
    n_params = np.array([int(np.prod(shapes[n], dtype=np.int64)) for n in prunable], dtype=np.int64)

    labels, rule = options.blocks.resolve(prunable)
    warnings = options.blocks.warnings(prunable, labels, [int(np.prod(shapes[n], dtype=np.int64))
                                                          for n in prunable])
    blocks = list(dict.fromkeys(labels))
    member = np.array([[lab == b for b in blocks] for lab in labels], dtype=np.int64)  # T x B
    block_flow = flow.compute_flow([rs.index for rs in rounds], n_params @ member,
                                   n_unpruned @ member, abs_sum @ member.astype(np.float64))
    source = mask_source(prunable, inferred)
    metrics = [(rs.index, name, float(value)) for rs, rnd in zip(rounds, run.rounds)
               for name, value in {**rs.metrics, **rnd.metrics}.items()]
    # survival of round n's kept weights into the next round, per tensor, then per block
    per_tensor = np.array([[survival_steps[rs.index][name] for name in prunable] for rs in rounds[:-1]],
                          dtype=np.int64)
    survival = np.einsum("stk,tb->sbk", per_tensor.reshape(len(rounds) - 1, len(prunable), 3), member)
    never = never_pruned(prunable, rounds)
    if never:
        run.notes.append(f"never pruned (a stored mask of all ones in every round): {', '.join(never)}")
    warnings = run.completeness_warnings() + warnings
    run.notes.extend(w for w in warnings if w not in run.notes)
    return RunResult(run, None, prunable, labels, blocks, rule, source, block_flow,
                     flow.eigen_summaries(block_flow, ("M", "P")), metrics, survival,
                     warnings, never, [int(v) for v in n_params])


def never_pruned(prunable: list[str], rounds: list[RoundSums]) -> list[str]:
    """Prunable tensors whose stored mask keeps every entry in every round of a run that prunes
    (open_lth's `pruning_layers_to_ignore`): their block's share grows only because others shrink."""
    if len(rounds) < 2:
        return []
    return [n for n in prunable if all(n in rs.tensors and rs.tensors[n].masked
                                       and rs.tensors[n].n_unpruned == rs.tensors[n].n_params for rs in rounds)]


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    masked: bool
    path: str
    kind: str = "f"


@dataclass
class Inspection:
    """What `inspect` shows of a run: found tensors, the prunable set and its blocks; no math."""

    run: Run
    error: str | None = None
    tensors: dict[str, TensorInfo] = field(default_factory=dict)   # union over rounds
    prunable: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    blocks_rule: str = ""
    mask_source: str = ""

    @property
    def unmatched(self) -> list[str]:
        return [n for n, lab in zip(self.prunable, self.labels) if lab == OTHER]


def inspect_runs(runs: list[Run], options: Options, progress: Callable[[int], None] | None = None) -> list[Inspection]:
    """What `inspect` shows of each run: every round's tensor headers are read (in parallel like
    `analyze_runs`, with `options.engine`), no tensor data."""
    options, _why = resolve_engine(runs, options)
    tasks = [((i, rnd.index), rnd) for i, run in enumerate(runs) if not run.error for rnd in run.rounds]
    listings: dict[int, dict[int, dict]] = {i: {} for i in range(len(runs))}
    errors: dict[int, dict[int, str]] = {i: {} for i in range(len(runs))}
    for (i, index), outcome in engines.map_rounds(tasks, options, progress, _listing_task):
        if isinstance(outcome, dict):
            listings[i][index] = outcome
        else:
            errors[i][index] = str(outcome)
    return [_inspection(run, [listings[i][r.index] for r in run.rounds] if not errors[i] else None,
                        errors[i][min(errors[i])] if errors[i] else run.error, options)
            for i, run in enumerate(runs)]


def _listing_task(rnd: Round, names: NameOptions, verify: bool = False) -> dict[str, TensorInfo] | RoundError:
    """The tensors of one round as `inspect` lists them (headers only); errors come back as values."""
    try:
        refs, _metrics, _notes = open_tensors(rnd, names)
        return {r.name: TensorInfo(r.shape, r.mask is not None, str(r.path), dtype_kind(r.weight)) for r in refs}
    except ScanError as exc:
        return RoundError(str(exc), exc.truncated)
    except Exception as exc:  # noqa: BLE001 - one unreadable round must not stop the other runs
        return RoundError(printable(f"{rnd.files[0] if rnd.files else '?'}: {type(exc).__name__}: {exc}"))


def _inspection(run: Run, listing: list[dict] | None, error: str | None, options: Options) -> Inspection:
    if error or listing is None:
        return Inspection(run, error)
    try:
        prunable, inferred = prunable_set(run, listing, options.infer_masks)
    except ScanError as exc:
        return Inspection(run, str(exc))
    tensors: dict[str, TensorInfo] = {}
    for tensors_of_round in listing:
        for name, info in tensors_of_round.items():
            tensors.setdefault(name, info)
    labels, rule = options.blocks.resolve(prunable)
    return Inspection(run, None, tensors, prunable, labels, rule, mask_source(prunable, inferred))
