"""analyze: discover runs -> reduce rounds (cached, optionally in parallel) -> flow math per run.

This module only orchestrates; reading is in `readers/`, sums in `reduce`, math in `flow`,
tables in `tables`. A run that fails is reported and the others go on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from flowscan import __version__, engines, flow
from flowscan.blocks import OTHER, BlockRules
from flowscan.errors import FlowscanError, ScanError, printable
from flowscan.io.atomic import atomic_path, write_text
from flowscan.io.location import location
from flowscan.readers import registry
from flowscan.readers.base import NameOptions, Round, Run
from flowscan.readers.discover import discover
from flowscan.reduce import RoundSums, TensorSums, open_tensors, reduce_round, survival_counts

CACHE_VERSION = 2


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
    # CRC-32 of zip members, checked as they are reduced: off by default, as it halves the warm
    # throughput of torch zip archives (benchmarks/bench_scan.py)
    verify: bool = False

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
    warnings: list[str] = field(default_factory=list)   # e.g. block rules that match nothing

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def n_prunable_params(self) -> int:
        return int(self.flow.n_params.sum()) if self.flow is not None else 0


def find_runs(root: Path, options: Options = Options(), exclude: Path | None = None) -> list[Run]:
    runs = discover(location(root), options.format, exclude)
    if not runs:
        formats = options.format or ", ".join(registry.names())
        raise FlowscanError(f"{root}: no IMP runs found (looked for: {formats})")
    return runs


def analyze(root: Path, options: Options = Options(), exclude: Path | None = None) -> list[RunResult]:
    """Every run below `root`, analysed (the Python entry point of `flowscan analyze`)."""
    return analyze_runs(find_runs(root, options, exclude), options)


def analyze_runs(runs: list[Run], options: Options,
                 progress: Callable[[int], None] | None = None) -> list[RunResult]:
    if options.strict:
        failed = next((r for r in runs if r.error), None)
        if failed:
            raise ScanError(None, failed.error)
    tasks = [(i, rnd) for i, run in enumerate(runs) if not run.error for rnd in run.rounds]
    results = {i: RunResult(run, error=run.error) for i, run in enumerate(runs) if run.error}
    pending = {i: len(run.rounds) for i, run in enumerate(runs) if not run.error}
    sums: dict[int, dict[int, RoundSums]] = {i: {} for i in pending}
    steps: dict[int, dict[int, dict]] = {i: {} for i in pending}   # survival counts per step
    errors: dict[int, str] = {}
    for i, outcome in _reduce_all(tasks, options, progress):
        if isinstance(outcome, RoundSums):
            sums[i][outcome.index] = outcome
            _count_survival(runs[i], sums[i], steps[i], outcome.index)
        elif options.strict:
            raise ScanError(None, outcome)
        else:
            errors.setdefault(i, outcome)
        pending[i] -= 1
        if pending[i] == 0:  # the run is complete: assemble it and let its sums go
            results[i] = _finish(runs[i], sums.pop(i), steps.pop(i), errors.get(i), options)
    return [results[i] for i in range(len(runs))]


def _count_survival(run: Run, sums: dict[int, RoundSums], steps: dict[int, dict], index: int) -> None:
    """Count survival for the steps `index` completes, then drop mask bits no step still needs,
    so at most a few rounds' bits are held whatever the number of rounds."""
    indices = {r.index for r in run.rounds}
    for a in (index - 1, index):
        if a in sums and a + 1 in sums and a not in steps:
            before, after = sums[a], sums[a + 1]
            steps[a] = {name: survival_counts(before.bits.get(name), after.bits.get(name), t.n_params)
                        for name, t in after.tensors.items() if name in before.tensors}
    for r in (index - 1, index, index + 1):
        done = (r - 1 not in indices or r - 1 in steps) and (r + 1 not in indices or r in steps)
        if r in sums and done and sums[r].bits:
            sums[r] = replace(sums[r], bits={})


def _finish(run: Run, sums: dict[int, RoundSums], steps: dict[int, dict], error: str | None,
            options: Options) -> RunResult:
    for rs in sums.values():  # what reading noticed (e.g. calls kept as inert records)
        run.notes.extend(n for n in rs.notes if n not in run.notes)
    if error:
        return RunResult(run, error=error)
    try:
        return assemble(run, [sums[r.index] for r in run.rounds], options, steps)
    except ScanError as exc:
        if options.strict:
            raise
        return RunResult(run, error=str(exc))


def _reduce_all(tasks, options: Options, progress, reduce_task=None):
    """(run number, RoundSums or error message) per task, as they complete (see engines.py)."""
    return engines.map_rounds(tasks, options, progress, reduce_task or _reduce_task)


def _reduce_task(rnd: Round, names: NameOptions, cache_dir: Path | None, verify: bool = False) -> RoundSums | str:
    """Reduce one round (from the cache when its files are unchanged); errors come back as text."""
    try:
        cached = cache_dir / f"{_cache_key(rnd, names, verify)}.json" if cache_dir else None
        if cached is not None and cached.is_file() and cached.with_suffix(".npz").is_file():
            try:
                with np.load(cached.with_suffix(".npz"), allow_pickle=False) as bits:
                    return replace(RoundSums.from_json(json.loads(cached.read_text())),
                                   bits={k: bits[k] for k in bits.files})
            except (ValueError, KeyError, TypeError, OSError):
                pass  # a damaged cache entry is recomputed
        result = reduce_round(rnd, names, verify)
        if cached is not None:  # bits first: the json marks the entry complete
            with atomic_path(cached.with_suffix(".npz")) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, **result.bits)
            write_text(cached, json.dumps(result.to_json()))
        return result
    except ScanError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - one unreadable round must not stop the other runs
        where = rnd.files[0] if rnd.files else "?"
        return printable(f"{where}: {type(exc).__name__}: {exc}")


def _cache_key(rnd: Round, names: NameOptions, verify: bool) -> str:
    files = []
    for f in rnd.files:
        st = f.stat()
        files.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    payload = json.dumps([CACHE_VERSION, __version__, rnd.reader, rnd.index, files,
                          [str(s) for s in rnd.spec], asdict(names), verify], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def prunable_set(run: Run, rounds: list[dict], infer_masks: bool) -> tuple[list[str], set[str]]:
    """(prunable tensors in model order, those whose masks are inferred from zeros), docs/definitions.md.

    `rounds` maps tensor names to anything with .shape, .masked and .path, per round in order.
    The prunable set is every tensor with a stored mask in some round; with no mask anywhere in
    the run (or when asked), 2+-dimensional tensors without one get masks from their zeros.
    """
    first: dict[str, tuple[tuple[int, ...], str, int]] = {}
    masked: set[str] = set()
    for rnd, tensors in zip(run.rounds, rounds):
        for name, t in tensors.items():
            if name not in first:
                first[name] = (t.shape, t.path, rnd.index)
            elif first[name][0] != t.shape:
                shape0, path0, round0 = first[name]
                raise ScanError(t.path, f"shape changes between rounds: {shape0} in round {round0} "
                                        f"({path0}), {t.shape} in round {rnd.index}", tensor=name)
            if t.masked:
                masked.add(name)
    infer = infer_masks or not masked
    inferred = {n for n, (shape, _p, _r) in first.items() if infer and n not in masked and len(shape) >= 2}
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
    run.notes.extend(w for w in warnings if w not in run.notes)
    blocks = list(dict.fromkeys(labels))
    member = np.array([[lab == b for b in blocks] for lab in labels], dtype=np.int64)  # T x B
    block_flow = flow.compute_flow([rs.index for rs in rounds], n_params @ member,
                                   n_unpruned @ member, abs_sum @ member.astype(np.float64))
    source = mask_source(prunable, inferred)
    metrics = [(rs.index, name, float(value)) for rs, rnd in zip(rounds, run.rounds)
               for name, value in {**rs.metrics, **rnd.metrics}.items()]
    # survival of round n's kept weights into round n+1, per tensor, then per block
    steps = [r for r in range(len(rounds) - 1) if rounds[r + 1].index == rounds[r].index + 1]
    per_tensor = np.array([[survival_steps[rounds[r].index][name] for name in prunable] for r in steps],
                          dtype=np.int64)
    survival = np.einsum("stk,tb->sbk", per_tensor.reshape(len(steps), len(prunable), 3), member)
    return RunResult(run, None, prunable, labels, blocks, rule, source, block_flow,
                     {q: flow.eigen_summary(block_flow, q) for q in ("M", "P")}, metrics, survival,
                     warnings)


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    masked: bool
    path: str


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


def inspect_run(run: Run, options: Options) -> Inspection:
    if run.error:
        return Inspection(run, run.error)
    try:
        listing = []
        for rnd in run.rounds:
            refs, _metrics, _notes = open_tensors(rnd, options.names)
            listing.append({r.name: TensorInfo(r.shape, r.mask is not None, str(r.path)) for r in refs})
        prunable, inferred = prunable_set(run, listing, options.infer_masks)
    except ScanError as exc:
        return Inspection(run, str(exc))
    tensors: dict[str, TensorInfo] = {}
    for tensors_of_round in listing:
        for name, info in tensors_of_round.items():
            tensors.setdefault(name, info)
    labels, rule = options.blocks.resolve(prunable)
    return Inspection(run, None, tensors, prunable, labels, rule, mask_source(prunable, inferred))
