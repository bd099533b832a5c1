"""Mutation fuzzing of every reader, shared by the test suite (small budget) and
`benchmarks/fuzz_readers.py` (long runs).

Each case mutates one file of a small real run (a fixture) and reads the round that file
belongs to through the reader and the reducer, as `flowscan analyze` does. Its outcome is one of

    identical      read, with the same sums, metrics and notes as the unmutated file
    changed        read without error but different (a silent data change when the format
                   carries checksums: zip members)
    named          a ScanError naming the file
    unnamed        any other exception (a defect)
    hang           over the per-case time limit (a defect)
    crash          the reading process died (a defect)

Cases run in a worker process, restarted after a hang or a crash, so the harness survives both.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import random
import shutil
import zipfile
from collections import Counter
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
OUTCOMES = ("identical", "changed", "named", "unnamed", "hang", "crash")
FORMATS = ("zip-bytes", "zip-pickle", "legacy", "bert-module", "safetensors", "npz", "flowscan-json", "flax",
           "keras-h5", "keras-zip", "orbax-json", "orbax-manifest")

# format -> (fixture run, reader, file to mutate within the run)
_SEEDS = {
    "zip-bytes": ("closed-form/prune-style", "prune-style", "1checkpoint.pth.tar"),
    "zip-pickle": ("closed-form/prune-style", "prune-style", "1checkpoint.pth.tar"),
    "legacy": (None, "prune-style", "1checkpoint.pth.tar"),
    "bert-module": ("bert-tickets/mrpc", "bert-tickets", "checkpoint-1000/model.pt"),
    "safetensors": ("closed-form/safetensors", "safetensors", "round_1.safetensors"),
    "npz": ("closed-form/npz", "safetensors", "round_1.npz"),
    "flowscan-json": ("closed-form/flowscan", "flowscan", "round_0001/round.json"),
    "flax": ("flax/imp-mlp", "flax", "checkpoint_300"),
    "keras-h5": ("keras/closed-form-h5", "keras", "round_1.h5"),
    "keras-zip": ("keras/closed-form-keras", "keras", "round_1.keras"),
    "orbax-json": ("orbax/closed-form", "orbax", "1/_METADATA"),
    "orbax-manifest": ("orbax/closed-form", "orbax", "1/manifest.ocdbt"),
}
_DEEP = "<deeply nested list>"   # replaced in the JSON text (json.dumps itself would recurse)
_INTERESTING = [0, 1, -1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**63 - 1, 2**64 - 1]


def prepare(work: Path) -> dict[str, Path]:
    """A pristine copy of each format's seed run below `work` (legacy files are made by torch)."""
    runs = {}
    for fmt, (fixture, _reader, _target) in _SEEDS.items():
        dest = work / "seeds" / fmt
        if not dest.exists():
            if fixture is None:  # the prune-style run re-saved in torch's pre-1.6 format
                import torch

                shutil.copytree(FIXTURES / "closed-form" / "prune-style", dest)
                for f in dest.iterdir():
                    obj = torch.load(f, weights_only=True)
                    torch.save(obj, f, _use_new_zipfile_serialization=False)
            else:
                shutil.copytree(FIXTURES / fixture, dest)
        runs[fmt] = dest
    return runs


def read_round(run: Path, fmt: str) -> str:
    """A fingerprint of the round holding the mutated file: its sums, metrics and notes."""
    from flowscan.readers import registry
    from flowscan.readers.base import NameOptions
    from flowscan.reduce import reduce_round

    _fixture, reader_name, target = _SEEDS[fmt]
    reader = registry.get(reader_name)
    rounds, _notes = reader.rounds(run)
    folder = (run / target).parent   # round.json is not read as a file of the round, but beside it
    rnd = next(r for r in rounds if any(Path(f) == run / target or (folder != run and Path(f).parent == folder)
                                        for f in r.files))
    if registry.get(rnd.reader).needs:   # read by a library (h5py, ...): in a watched process, as analyze does
        sums = _watched(rnd)
    else:
        sums = reduce_round(rnd, NameOptions(), verify=True).to_json()
    for tensor in sums["tensors"]:
        del tensor["path"]   # the case's own folder
    return json.dumps([sums, dict(rnd.metrics)], sort_keys=True, default=str)


WATCH_SECONDS = 5.0   # the read timeout of rounds parsed by a library, below the harness's hang limit


def _watched(rnd) -> dict:
    """The round's sums reduced through the watchdog; its errors raised as the reducer raised them."""
    from flowscan import engines, pipeline
    from flowscan.errors import ScanError

    options = pipeline.Options(jobs=1, read_timeout=WATCH_SECONDS)
    ((_i, outcome),) = engines.map_rounds([(0, rnd)], options, None, _reduce_in_worker)
    if isinstance(outcome, str):   # the watchdog's own: a timeout or a dead worker, naming the file
        raise ScanError(None, outcome)
    kind, value = outcome
    if kind == "named":
        raise ScanError(*value)
    if kind == "unnamed":
        raise RuntimeError(value)
    return value


def _reduce_in_worker(rnd, names, verify):
    """reduce_round in a watched worker, its outcome kept apart (pipeline's task names every error)."""
    from flowscan.errors import ScanError
    from flowscan.reduce import reduce_round

    try:
        return "ok", reduce_round(rnd, names, verify).to_json()
    except ScanError as exc:
        return "named", (exc.path, exc.message, exc.tensor)
    except Exception as exc:  # noqa: BLE001 - what the fuzzer looks for
        return "unnamed", f"{type(exc).__name__}: {exc}"


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to three byte-level mutations: flips, truncation, insertion, interesting integers,
    duplicated chunks."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(5)
        at = rng.randrange(max(len(out), 1))
        if kind == 0 and out:
            out[at] ^= 1 << rng.randrange(8)
        elif kind == 1:
            del out[at:]
        elif kind == 2:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif kind == 3:
            width = rng.choice((1, 2, 4, 8))
            value = rng.choice(_INTERESTING) & ((1 << (8 * width)) - 1)
            out[at:at + width] = value.to_bytes(width, "little")
        else:
            n = rng.randint(1, 64)
            out[at:at] = out[max(0, at - n):at]
    return bytes(out)


def _mutate_json(data: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.3:
        return mutate(data, rng)
    obj = json.loads(data)
    choices = [[], "x", None, 1e308, -1, 2**80, {"a": {}}, [[[[]]]], True, "\udcff", _DEEP]
    if rng.random() < 0.3 or not isinstance(obj, dict):
        obj = rng.choice(choices)
    else:
        key = rng.choice(list(obj) + ["metrics"])
        if key == "metrics" and isinstance(obj.get("metrics"), dict) and rng.random() < 0.5 and obj["metrics"]:
            obj["metrics"][rng.choice(list(obj["metrics"]))] = rng.choice(choices)
        else:
            obj[key] = rng.choice(choices)
    depth = rng.choice((10, 3000, 100_000))
    text = json.dumps(obj, allow_nan=True).replace(json.dumps(_DEEP), "[" * depth + "0" + "]" * depth)
    return text.encode("utf-8", "surrogatepass")


def _mutate_zip_pickle(data: bytes, rng: random.Random) -> bytes:
    """Mutate data.pkl inside the archive and write a consistent zip (valid CRCs), so the
    mutations reach the unpickler instead of stopping at the checksum."""
    src = zipfile.ZipFile(io.BytesIO(data))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as dst:
        for info in src.infolist():
            payload = src.read(info)
            if info.filename.endswith("data.pkl"):
                payload = mutate(payload, rng)
            dst.writestr(info.filename, payload)
    return buf.getvalue()


def make_case(seed_run: Path, case_dir: Path, fmt: str, index: int) -> Path:
    """Case `index` of `fmt`: a copy of the seed run with one file mutated (deterministic)."""
    rng = random.Random(f"{fmt}:{index}")
    if case_dir.exists():
        shutil.rmtree(case_dir)
    shutil.copytree(seed_run, case_dir)
    target = case_dir / _SEEDS[fmt][2]
    data = target.read_bytes()
    if fmt.endswith("-json"):
        data = _mutate_json(data, rng)
    elif fmt == "zip-pickle":
        data = _mutate_zip_pickle(data, rng)
    else:
        data = mutate(data, rng)
    target.write_bytes(data)
    return case_dir


def _classify(seed_run: Path, work: Path, fmt: str, index: int, baseline: str) -> str:
    from flowscan.errors import ScanError

    case = make_case(seed_run, work / f"case-{fmt}", fmt, index)
    try:
        got = read_round(case, fmt)
    except ScanError as exc:
        return "named" if str(case) in str(exc) or exc.path else "unnamed"
    except Exception:  # noqa: BLE001 - exactly what the fuzzer is looking for
        return "unnamed"
    return "identical" if got == baseline else "changed"


def _worker(conn, seed_runs: dict, work: str) -> None:
    work_path = Path(work)
    baselines = {fmt: read_round(Path(run), fmt) for fmt, run in seed_runs.items()}
    conn.send("ready")
    while True:
        job = conn.recv()
        if job is None:
            return
        fmt, index = job
        outcome = _classify(Path(seed_runs[fmt]), work_path, fmt, index, baselines[fmt])
        conn.send(outcome)


def run(work: Path, formats=FORMATS, cases: int = 100, timeout: float = 20.0, start: int = 0,
        examples: dict | None = None) -> dict[str, Counter]:
    """Counts of outcomes per format; `examples` collects (format, case) of each defect."""
    seeds = {fmt: str(p) for fmt, p in prepare(work).items() if fmt in formats}
    ctx = multiprocessing.get_context("spawn")
    counts = {fmt: Counter() for fmt in formats}
    worker = conn = None

    def start_worker():
        parent, child = ctx.Pipe()
        # not a daemon: it starts the watchdog's workers of its own (killed below with it)
        proc = ctx.Process(target=_worker, args=(child, seeds, str(work / "cases")), daemon=False)
        proc.start()
        if not parent.poll(60) or parent.recv() != "ready":
            raise RuntimeError("fuzz worker did not start")
        return proc, parent

    try:
        for fmt in formats:
            for index in range(start, start + cases):
                if worker is None or not worker.is_alive():
                    worker, conn = start_worker()
                conn.send((fmt, index))
                if conn.poll(timeout):
                    try:
                        outcome = conn.recv()
                    except EOFError:
                        outcome = "crash"
                else:
                    outcome = "crash" if not worker.is_alive() else "hang"
                if outcome in ("hang", "crash"):
                    worker.kill()
                    worker.join()
                    worker = None
                counts[fmt][outcome] += 1
                if examples is not None and outcome in ("unnamed", "hang", "crash") + (
                        ("changed",) if fmt == "zip-bytes" else ()):
                    examples.setdefault(fmt, []).append((index, outcome))
    finally:
        if worker is not None and worker.is_alive():
            conn.send(None)
            worker.join(5)
            worker.kill()
    return counts
