"""Scan throughput and peak memory of `flowscan analyze` at ResNet-50 scale, against baselines.

    python benchmarks/bench_scan.py --data /tmp/flowscan-bench          # build once, then measure
    python benchmarks/bench_scan.py --data /tmp/flowscan-bench --scale 0.1 --rounds 3   # quick

Builds a synthetic IMP archive with torchvision ResNet-50's conv and fc shapes (25.5 M
prunable parameters) for `--rounds` rounds, in two layouts: per-round safetensors with uint8
masks, and Chen et al.-style prune-style `{k}checkpoint.pth.tar` (float32 weight_orig and
weight_mask). Then, each in a fresh subprocess (so peak RSS is its own), on a warm page cache:

  flowscan         pipeline.analyze (what `flowscan analyze` runs): one job, then every core with
                   each engine (threads, processes, a local dask cluster), and with --verify
                   (CRC-32 of every zip member) on the torch files
  touch            every core touching every byte of the files through a memory map, no copy (numpy's
                   xor-reduce over 8-byte words, a file at a time per thread): the machine's limit
  plain-read       reading the same files' bytes into one reused buffer (an I/O ceiling)
  naive            torch.load(weights_only=True) of each whole file + per-tensor (w*m).abs().sum()

and prints GB/s (archive bytes / wall seconds), peak RSS in MiB (VmHWM; with processes or dask
the parent's only: workers hold one round each) and the ratios the targets are stated in.
`--cold` drops the page cache before every measurement (root only; it says when it cannot).

    python benchmarks/bench_scan.py --dtypes        # float32, bfloat16 and float16 weights with uint8 masks
        # (12 layers of 2048x1024 x 10 rounds): flowscan beside the touch limit, plain read and naive
    python benchmarks/bench_scan.py --many 5000     # analyze, --no-verify and inspect of 5,000 small files vs the naive loop

builds 5,000 small prune-style checkpoint files (500 runs x 10 rounds of a 3-layer MLP, 60 kB each)
and times `flowscan analyze` (CRC-32 checks on), `analyze --no-verify` and `inspect` (headers only)
through the CLI, start-up included, beside the naive torch.load loop, in files per second (the best
of --repeat runs taken in turns).

    python benchmarks/bench_scan.py --startup       # the CLI's start-up on a fixture (analyze, inspect)
    python benchmarks/bench_scan.py --inner-loop    # the chunk reduction against numexpr, numba and
        # the kernel's loops; then each loop per dtype pair on one chunk in cache
    python benchmarks/bench_scan.py --kernels --scale 0.25 --rounds 4
        # the fused kernel (flowscan/_fused.c: its fastest loop, and FLOWSCAN_KERNEL=portable)
        # against the numpy path (FLOWSCAN_KERNEL=numpy) for every weight x mask dtype pair, as
        # fractions of a plain read; and the CLI's start-up
"""

from __future__ import annotations

import argparse
import shutil
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def resnet50_shapes(scale: float = 1.0) -> dict[str, tuple[int, ...]]:
    """torchvision resnet50 conv/fc weight shapes (channels scaled by sqrt(scale))."""
    k = scale ** 0.5

    def ch(c):
        return max(1, int(round(c * k)))

    shapes = {"conv1.weight": (ch(64), 3, 7, 7)}
    cin = ch(64)
    for stage, (width, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for b in range(blocks):
            w, out = ch(width), ch(width * 4)
            p = f"layer{stage}.{b}"
            shapes[f"{p}.conv1.weight"] = (w, cin, 1, 1)
            shapes[f"{p}.conv2.weight"] = (w, w, 3, 3)
            shapes[f"{p}.conv3.weight"] = (out, w, 1, 1)
            if b == 0:
                shapes[f"{p}.downsample.0.weight"] = (out, cin, 1, 1)
            cin = out
    shapes["fc.weight"] = (1000, cin)
    return shapes


def build(data: Path, rounds: int, scale: float) -> None:
    import torch
    from safetensors.numpy import save_file

    marker = data / f"built-{rounds}-{scale}.json"
    if marker.exists():
        return
    shapes = resnet50_shapes(scale)
    rng = np.random.default_rng(0)
    (data / "safetensors").mkdir(parents=True, exist_ok=True)
    (data / "prune-style").mkdir(parents=True, exist_ok=True)
    masks = {k: np.ones(s, np.uint8) for k, s in shapes.items()}
    for n in range(rounds):
        weights = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
        flat = {**weights, **{f"{k}_mask": m for k, m in masks.items()}}
        save_file(flat, str(data / "safetensors" / f"round_{n}.safetensors"))
        state = {}
        for k, w in weights.items():
            state[f"{k}_orig"] = torch.from_numpy(w)
            state[f"{k}_mask"] = torch.from_numpy(masks[k].astype(np.float32))
        torch.save({"state": n, "state_dict": state}, data / "prune-style" / f"{n}checkpoint.pth.tar")
        for k, w in weights.items():  # prune 20 % of the survivors (per tensor, enough for timing)
            alive = np.abs(w)[masks[k] == 1]
            masks[k] = (masks[k] == 1) & (np.abs(w) > np.quantile(alive, 0.2))
            masks[k] = masks[k].astype(np.uint8)
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    marker.write_text(json.dumps({"rounds": rounds, "scale": scale, "prunable_params": n_params}))


def archive_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and not p.name.startswith("built"))


def method_flowscan(folder: Path, jobs: int, verify: bool = False, engine: str = "threads") -> None:
    """flowscan without CRC checks (`--no-verify`); `flowscan-verify` is the default `analyze`."""
    from flowscan import pipeline

    results = pipeline.analyze(folder, pipeline.Options(jobs=jobs, verify=verify, engine=engine))
    assert results[0].ok, results[0].error


def method_plain_read(folder: Path) -> None:
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    for path in sorted(p for p in folder.iterdir() if not p.name.startswith("built")):
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass


def method_touch(folder: Path, jobs: int) -> None:
    """The machine's limit for a scan: `jobs` threads touch every byte of the files through a memory
    map (numpy's xor-reduce over 8-byte words: no copy, and it releases the GIL), a file at a time
    each, as flowscan's threads take rounds."""
    import mmap
    from concurrent.futures import ThreadPoolExecutor

    def touch(path: Path) -> int:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            words = np.frombuffer(mm, np.uint64, len(mm) // 8)
            tail = np.frombuffer(mm, np.uint8, len(mm) % 8, offset=len(mm) - len(mm) % 8)
            value = int(np.bitwise_xor.reduce(words)) ^ int(np.bitwise_xor.reduce(tail, initial=0))
            del words, tail   # views must go before the map closes
            return value

    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("built"))
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(touch, files))


def method_naive(folder: Path) -> None:
    import torch

    for path in sorted(p for p in folder.iterdir() if not p.name.startswith("built")):
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(path, weights_only=True)["state_dict"]
        total = 0.0
        for name, t in sd.items():
            if name.endswith("_mask"):
                continue
            base = name.removesuffix("_orig")
            mask = sd.get(base + "_mask")
            total += float((t * mask).abs().sum()) if mask is not None else float(t.abs().sum())
        del sd


def rss_mib() -> float:
    """Resident memory now (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    # VmHWM starts afresh at exec; ru_maxrss would carry the parent's high-water mark over.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(method: str, folder: Path, jobs: int) -> None:
    if method.startswith("flowscan"):  # imports are not part of the scan (the readers load on first use)
        import flowscan.pipeline  # noqa: F401
        from flowscan.readers import registry
        registry.all_readers()
    elif method == "naive":
        import safetensors.torch  # noqa: F401
        import torch  # noqa: F401
    elif method == "touch":
        import concurrent.futures  # noqa: F401
        import mmap  # noqa: F401
    before = rss_mib()   # the interpreter and its imports, before the scan
    start = time.perf_counter()
    if method.startswith("flowscan"):
        engine = method.split("-")[1] if method.count("-") else "threads"
        method_flowscan(folder, jobs, verify=method == "flowscan-verify", engine=engine if engine != "verify" else "threads")
    elif method == "plain-read":
        method_plain_read(folder)
    elif method == "touch":
        method_touch(folder, jobs)
    else:
        method_naive(folder)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "maxrss_mib": peak_rss_mib(), "rss_before_mib": before}))


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (root only): a cold-cache measurement."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def child_env(env: dict | None = None) -> dict:
    """The children's environment, with Python's bytecode cache allowed as after `pip install`
    (a shell's PYTHONDONTWRITEBYTECODE would make every run recompile the modules it imports)."""
    env = dict(os.environ if env is None else env)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def measure(method: str, folder: Path, jobs: int = 1, repeat: int = 5, cold: bool = False,
            env: dict | None = None) -> dict:
    best = None
    for _ in range(repeat):
        if cold:
            drop_page_cache()
        out = subprocess.run([sys.executable, __file__, "--child", method, "--folder", str(folder), "--jobs", str(jobs)],
                             check=True, capture_output=True, text=True, env=child_env(env)).stdout
        result = json.loads(out.strip().splitlines()[-1])
        best = result if best is None or result["seconds"] < best["seconds"] else best
    return best


def build_many(folder: Path, n_files: int) -> None:
    """`n_files` small prune-style checkpoints (torch.nn.utils.prune state dicts of a 3-layer MLP):
    runs of 10 rounds, as Chen et al.'s code writes them."""
    import torch

    marker = folder / f"built-{n_files}.json"
    if marker.exists():
        return
    rng = np.random.default_rng(0)
    shapes = {"fc1.weight": (64, 196), "fc2.weight": (32, 64), "fc3.weight": (10, 32)}
    for r in range(max(1, n_files // 10)):
        run = folder / f"run_{r:05d}"
        run.mkdir(parents=True, exist_ok=True)
        for n in range(10):
            state = {f"{k}_orig": torch.from_numpy(rng.standard_normal(s, dtype=np.float32)) for k, s in shapes.items()}
            state.update({f"{k}_mask": torch.from_numpy((rng.random(s) < 0.8 ** n).astype(np.float32))
                          for k, s in shapes.items()})
            torch.save({"state_dict": state}, run / f"{n}checkpoint.pth.tar")
    marker.write_text(json.dumps({"files": n_files}))


def naive_many(folder: Path) -> tuple[int, float]:
    """The loop a user writes: torch.load(weights_only=True) of each file, sum |w*m| per tensor."""
    import torch

    files = sorted(folder.rglob("*.pth.tar"))
    start = time.perf_counter()
    for path in files:
        state = torch.load(path, weights_only=True)["state_dict"]
        total = 0.0
        for key, value in state.items():
            if key.endswith("_orig"):
                total += float((value * state[key[:-len("_orig")] + "_mask"]).abs().sum())
    return len(files), time.perf_counter() - start


def inner_loop(n: int = 25_000_000) -> None:
    """The per-chunk reduction against one-pass candidates (numexpr, numba; each if installed),
    over in-memory float32 weights and uint8 masks: is a dependency worth it?"""
    from flowscan.readers.base import TensorRef
    from flowscan.reduce import CHUNK, _Buffers, _reduce_chunks

    rng = np.random.default_rng(0)
    w = rng.standard_normal(n, dtype=np.float32)
    m = (rng.random(n) < 0.5).astype(np.uint8)
    gb = (w.nbytes + m.nbytes) / 1e9

    from flowscan import reduce

    def numpy_chunks():   # flowscan's numpy path: the kernel set aside
        saved, reduce.KERNEL = reduce.KERNEL, None
        try:
            bits = np.empty((n + 7) // 8, np.uint8)
            return _reduce_chunks(w, m, TensorRef("x", w, m, "p"), _Buffers(), [], False, bits)[0]
        finally:
            reduce.KERNEL = saved

    candidates = {"numpy, chunked (flowscan)": numpy_chunks}
    try:
        import numexpr as ne

        ne.set_num_threads(1)

        def numexpr_pass():   # the sum in one pass; count and bits as flowscan does them
            total = 0.0
            for s in range(0, n, CHUNK):
                wc, mc = w[s:s + CHUNK], m[s:s + CHUNK]  # noqa: F841 - used by name in the expression
                total += float(ne.evaluate("sum(where(mc != 0, abs(wc) * 1.0, 0.0))"))
                np.count_nonzero(mc)
                np.packbits(mc.view(np.bool_))
            return total
        candidates["numexpr"] = numexpr_pass
    except ImportError:
        print("numexpr: not installed")
    try:
        from numba import njit

        @njit
        def kernel(w, m, bits):   # sum, count and bits in one loop
            total, ones = 0.0, 0
            for i in range(w.size):
                if m[i]:
                    total += abs(w[i])
                    ones += 1
                    bits[i >> 3] |= np.uint8(128 >> (i & 7))
            return total, ones

        def numba_pass():
            return kernel(w, m, np.zeros((n + 7) // 8, np.uint8))[0]
        numba_pass()   # compile outside the timing
        candidates["numba"] = numba_pass
    except ImportError:
        print("numba: not installed")
    if reduce.KERNEL is not None:
        for isa in getattr(reduce.KERNEL, "ISAS", ()):
            def kernel_pass(isa=isa):
                bits, total = np.empty((n + 7) // 8, np.uint8), 0.0
                for s in range(0, n, CHUNK):
                    total += reduce.KERNEL.reduce_chunk(w[s:s + CHUNK], "f4", m[s:s + CHUNK], "u1",
                                                        bits[s // 8:(s + CHUNK) // 8], isa)[0]
                return total
            candidates[f"flowscan kernel, {isa} loop"] = kernel_pass
    reference = numpy_chunks()
    for name, fn in candidates.items():
        times = []
        for _ in range(5):
            start = time.perf_counter()
            value = fn()
            times.append(time.perf_counter() - start)
        print(f"{name:<28} {gb / min(times):6.2f} GB/s  (relative difference {abs(value - reference) / reference:.1e})")


def kernel_loops(repeat: int = 200) -> None:
    """Each loop of the compiled kernel on one chunk held in cache, per weight x mask dtype pair, in
    G elements/s: the loop's own speed, without memory, page faults or Python around it."""
    from flowscan import reduce
    from flowscan.reduce import CHUNK

    if reduce.KERNEL is None:
        print("the kernel is not compiled here")
        return
    rng = np.random.default_rng(0)
    w32 = rng.standard_normal(CHUNK, dtype=np.float32)
    keep = rng.random(CHUNK) < 0.5
    weights = {"float32": (w32, "f4"), "float16": (w32.astype(np.float16), "f2"),
               "bfloat16": ((w32.view(np.uint32) >> 16).astype(np.uint16), "bf16"),
               "float64": (w32.astype(np.float64), "f8")}
    masks = {"none": (None, ""), "uint8": (keep.astype(np.uint8), "u1"), "float32": (keep.astype(np.float32), "f4"),
             "float16": (keep.astype(np.float16), "f2")}
    bits = np.empty(CHUNK // 8, np.uint8)
    for _ in range(50):   # warm up: the first calls of a process run slow
        reduce.KERNEL.reduce_chunk(w32, "f4", None, "", bits)
    isas = getattr(reduce.KERNEL, "ISAS", ("one loop",))   # an older build has a single loop
    print(f"{'weight x mask':<20}" + "".join(f" {isa:>10}" for isa in isas) + "   (G elements/s, one chunk in cache)")
    for wname, (w, wcode) in weights.items():
        for mname, (m, mcode) in masks.items():
            cells = ""
            for isa in isas:
                args = (w, wcode, m, mcode, bits) + ((isa,) if hasattr(reduce.KERNEL, "ISAS") else ())
                best = float("inf")
                for _ in range(5):   # the best of 5 batches: noise only adds time
                    start = time.perf_counter()
                    for _ in range(repeat // 5):
                        reduce.KERNEL.reduce_chunk(*args)
                    best = min(best, time.perf_counter() - start)
                cells += f" {CHUNK * (repeat // 5) / best / 1e9:>10.2f}"
            print(f"{wname + ' x ' + mname:<20}{cells}", flush=True)


def many(data: Path, n_files: int, jobs: int, repeat: int = 3) -> None:
    """analyze and inspect of many small files through the CLI (start-up included), beside the naive
    loop, in files/s; analyze into a fresh folder, so its per-round cache is written as a user's is.
    The methods take turns, `repeat` times over, and each keeps its best (noise only adds time)."""
    folder = data / f"many-{n_files}"
    build_many(folder, n_files)
    method_plain_read_tree(folder)   # warm
    commands = {"analyze": ["analyze", str(folder), "-o", str(data / "many-out"), "-q"],
                "analyze --no-verify": ["analyze", str(folder), "-o", str(data / "many-out"), "-q", "--no-verify"],
                "inspect": ["inspect", str(folder), "-q"]}
    best: dict[str, float] = {}
    for _ in range(repeat):
        files, seconds = naive_many(folder)
        best["naive"] = min(best.get("naive", seconds), seconds)
        for label, args in commands.items():
            shutil.rmtree(data / "many-out", ignore_errors=True)
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "flowscan", *args], check=True, capture_output=True, env=child_env())
            seconds = time.perf_counter() - start
            best[label] = min(best.get(label, seconds), seconds)
    naive = files / best["naive"]
    print(f"naive loop: {files} files in {best['naive']:.2f} s = {naive:.0f} files/s (best of {repeat}, in turns)")
    for label in commands:
        rate = files / best[label]
        print(f"{label:<20} {rate:6.0f} files/s ({best[label]:.2f} s) = {rate / naive:.2f} x naive", flush=True)


KERNEL_PAIRS = [("float32", "uint8"), ("float32", "bool"), ("float32", "float32"), ("float32", None),
                ("float16", "uint8"), ("float16", "float16"), ("bfloat16", "uint8"), ("bfloat16", "bfloat16"),
                ("float64", "uint8")]


def build_pair(folder: Path, wdtype: str, mdtype: str | None, rounds: int,
               shapes: dict[str, tuple[int, ...]]) -> None:
    """Per-round safetensors of these weight shapes in one weight x mask dtype pair (mask None: none
    stored), each round keeping 80 % of the one before at random."""
    import torch
    from safetensors.torch import save_file

    marker = folder / "built.json"
    if marker.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n in range(rounds):
        tensors = {}
        for k, shape in shapes.items():
            tensors[k] = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).to(getattr(torch, wdtype))
            if mdtype:
                keep = torch.from_numpy(rng.random(shape) < 0.8 ** n)
                tensors[f"{k}_mask"] = keep if mdtype == "bool" else keep.to(getattr(torch, mdtype))
        save_file(tensors, str(folder / f"round_{n}.safetensors"))
    marker.write_text("{}")


def kernels(data: Path, rounds: int, scale: float, cores: int) -> None:
    """Warm throughput of the fused kernel (its fastest loop, and its portable one) and of the numpy
    path for every dtype pair, as a fraction of a plain read of the same files; then the CLI's
    start-up on a small fixture. Each figure is the best of 7 runs taken in turns with the others
    (noise only adds time)."""
    from flowscan import reduce

    envs = {"kernel": None, "portable": {**os.environ, "FLOWSCAN_KERNEL": "portable"},
            "numpy": {**os.environ, "FLOWSCAN_KERNEL": "numpy"}}
    isa = getattr(reduce.KERNEL, "ISA", "compiled") if reduce.KERNEL is not None else "not compiled"
    print(f"flowscan analyze -j{cores} against one plain read of the same files (warm page cache); "
          f"kernel: its {isa} loop")
    print(f"{'weight x mask':<22} {'GB':>6} {'plain GB/s':>10}" + "".join(f" {k:>14}" for k in envs) + "   (GB/s, x plain read)")
    for wdtype, mdtype in KERNEL_PAIRS:
        folder = data / f"pairs-r{rounds}-s{scale}" / f"{wdtype}-{mdtype or 'none'}"
        build_pair(folder, wdtype, mdtype, rounds, resnet50_shapes(scale))
        size = archive_bytes(folder)
        method_plain_read(folder)
        # the methods take turns, 7 times over, and each keeps its best: a slow spell of the
        # machine then falls on all of them rather than on one
        best: dict[str, float] = {}
        for _ in range(7):
            for name, method, jobs, env in [("plain", "plain-read", 1, None)] + [
                    (name, "flowscan", cores, env) for name, env in envs.items()]:
                seconds = measure(method, folder, jobs, repeat=1, env=env)["seconds"]
                best[name] = min(best.get(name, seconds), seconds)
        plain = size / 1e9 / best["plain"]
        cells = ""
        for name in envs:
            rate = size / 1e9 / best[name]
            cells += f" {rate:>7.2f} {rate / plain:>5.2f}x"
        print(f"{wdtype + ' x ' + str(mdtype):<22} {size / 1e9:>6.2f} {plain:>10.2f}{cells}", flush=True)
    startup()


def startup(repeat: int = 9) -> None:
    """Wall time of `flowscan analyze` and `flowscan inspect` on fixtures/closed-form (4 runs of 5 tiny
    rounds): the CLI's start-up, imports first of all (`python -X importtime` tells which)."""
    fixture = REPO / "fixtures" / "closed-form"
    with tempfile.TemporaryDirectory() as out:
        for label, args in (("analyze", ["analyze", str(fixture), "-o", out, "-q", "--no-cache"]),
                            ("inspect", ["inspect", str(fixture), "-q"])):
            times = []
            for _ in range(repeat):
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "flowscan", *args], check=True, capture_output=True,
                               env=child_env())
                times.append(time.perf_counter() - start)
            print(f"CLI start-up: flowscan {label} fixtures/closed-form: {min(times):.2f} s (best of {repeat}, "
                  f"median {sorted(times)[repeat // 2]:.2f} s; bytecode cached, as after pip install)", flush=True)


DTYPE_PAIRS = [("float32", "uint8"), ("bfloat16", "uint8"), ("float16", "uint8")]


def dtypes(data: Path, rounds: int, tensors: int, shape: tuple[int, int], cores: int, cold: bool,
           repeat: int = 7) -> None:
    """flowscan analyze -jN on each weight x mask dtype pair beside the machine's limits, all in one
    run: `touch` (N threads touching every byte through a memory map, no copy: the most a scan
    that reads every byte can do), one plain read of the files, and the naive torch loop. The
    methods take turns, `repeat` times over, and each keeps its best (noise only adds time)."""
    if cold and not drop_page_cache():
        print("could not drop the page cache (needs root): these figures are warm-cache ones")
        cold = False
    largest = int(np.prod(shape)) * 4
    print(f"{rounds} rounds x {tensors} tensors of {shape[0]}x{shape[1]} (+ uint8 masks) per dtype pair; "
          f"{cores} cores; {'cold' if cold else 'warm'} page cache; best of {repeat} in turns")
    print(f"{'weight x mask':<18} {'GB':>5} {'touch':>7} {'plain':>7} {'naive':>7} {'flowscan':>9}   "
          f"{'x touch':>7} {'x plain':>7} {'x naive':>7} {'peak RSS (+ over imports)':>26}")
    methods = [("touch", "touch", cores), ("plain", "plain-read", 1), ("naive", "naive", 1),
               ("flowscan", "flowscan", cores)]
    for wdtype, mdtype in DTYPE_PAIRS:
        folder = data / f"layers-r{rounds}-t{tensors}-{shape[0]}x{shape[1]}" / f"{wdtype}-{mdtype}"
        build_pair(folder, wdtype, mdtype, rounds, {f"layers.{k}.weight": shape for k in range(tensors)})
        size = archive_bytes(folder)
        if not cold:
            method_plain_read(folder)
        best: dict[str, dict] = {}
        for _ in range(repeat):
            for name, method, jobs in methods:
                r = measure(method, folder, jobs, repeat=1, cold=cold)
                if name not in best or r["seconds"] < best[name]["seconds"]:
                    best[name] = r
        rate = {name: size / 1e9 / r["seconds"] for name, r in best.items()}
        grown = best["flowscan"]["maxrss_mib"] - best["flowscan"]["rss_before_mib"]
        f = rate["flowscan"]
        print(f"{wdtype + ' x ' + mdtype:<18} {size / 1e9:>5.2f} {rate['touch']:>7.2f} {rate['plain']:>7.2f} "
              f"{rate['naive']:>7.2f} {f:>9.2f}   {f / rate['touch']:>6.2f}x {f / rate['plain']:>6.2f}x "
              f"{f / rate['naive']:>6.2f}x {best['flowscan']['maxrss_mib']:>9.0f} MiB (+{grown:.0f} MiB)", flush=True)
    print(f"(GB/s; touch -j{cores}, plain read and naive -j1, flowscan analyze -j{cores} --no-verify; peak RSS is "
          f"flowscan's VmHWM, + what the scan added to the imports' resident memory; the largest tensor "
          f"{largest / 2**20:.0f} MiB as float32)")


def method_plain_read_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            path.read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/flowscan-bench"))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of ResNet-50's parameter count")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--jobs", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each measurement (root)")
    parser.add_argument("--many", type=int, metavar="N", help="time analyze, analyze --no-verify and inspect of N small checkpoint files "
                             "beside the naive torch.load loop instead")
    parser.add_argument("--inner-loop", action="store_true", help="time the chunk reduction against candidates, and the kernel's loops per dtype pair")
    parser.add_argument("--kernels", action="store_true",
                        help="the fused kernel against the numpy path for every dtype pair, and the CLI start-up")
    parser.add_argument("--cores", type=int, default=None, help="jobs for the all-cores runs (default: all)")
    parser.add_argument("--dtypes", action="store_true",
                        help="flowscan beside the touch limit, plain read and naive for float32, bfloat16 and "
                             "float16 weights with uint8 masks (--tensors, --shape, --rounds)")
    parser.add_argument("--startup", action="store_true", help="the CLI's start-up: analyze and inspect of a fixture")
    parser.add_argument("--tensors", type=int, default=12, help="layers per round for --dtypes")
    parser.add_argument("--shape", default="2048x1024", help="each layer's shape for --dtypes")
    parser.add_argument("--repeat", type=int, default=None,
                        help="measurements per method for --dtypes (default 7) and --many (default 3); the best is kept")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.folder, args.jobs)
        return
    from flowscan.engines import default_jobs

    cores = args.cores or default_jobs()
    if args.many:
        many(args.data, args.many, cores, args.repeat or 3)
        return
    if args.inner_loop:
        inner_loop()
        kernel_loops()
        return
    if args.kernels:
        kernels(args.data, args.rounds, args.scale, cores)
        return
    if args.startup:
        startup()
        return
    if args.dtypes:
        rows, cols = (int(x) for x in args.shape.lower().split("x"))
        dtypes(args.data, args.rounds, args.tensors, (rows, cols), cores, args.cold, args.repeat or 7)
        return
    data = args.data / f"r{args.rounds}-s{args.scale}"
    build(data, args.rounds, args.scale)
    info = json.loads((data / f"built-{args.rounds}-{args.scale}.json").read_text())
    print(f"archive: {info['prunable_params'] / 1e6:.1f} M prunable parameters x {args.rounds} rounds; "
          f"{cores} cores; {'cold' if args.cold else 'warm'} page cache")
    if args.cold and not drop_page_cache():
        print("could not drop the page cache (needs root): these figures are warm-cache ones")
        args.cold = False
    print(f"{'layout':<12} {'method':<22} {'GB':>6} {'seconds':>8} {'GB/s':>6} {'peak RSS MiB':>13}")
    for layout in ("safetensors", "prune-style"):
        folder = data / layout
        size = archive_bytes(folder)
        if not args.cold:
            method_plain_read(folder)  # warm the page cache
        rates = {}
        for method, jobs in (("flowscan", 1), ("flowscan", cores), ("flowscan-processes", cores),
                             ("flowscan-dask", cores), ("flowscan-verify", cores), ("touch", cores),
                             ("plain-read", 1), ("naive", 1)):
            if method == "flowscan-verify" and layout == "safetensors":
                continue   # safetensors carry no checksum
            if method == "flowscan-dask" and importlib.util.find_spec("distributed") is None:
                continue
            r = measure(method, folder, jobs, cold=args.cold)
            label = f"{method} -j{jobs}" if method.startswith("flowscan") or method == "touch" else method
            rates[label] = size / 1e9 / r["seconds"]
            print(f"{layout:<12} {label:<22} {size / 1e9:>6.2f} {r['seconds']:>8.2f} "
                  f"{rates[label]:>6.2f} {r['maxrss_mib']:>13.0f}", flush=True)
        best = rates[f"flowscan -j{cores}"]
        print(f"{layout:<12} flowscan -j{cores} (threads): {best / rates[f'touch -j{cores}']:.2f} x the touch limit, "
              f"{best / rates['plain-read']:.2f} x plain read, {best / rates['naive']:.2f} x naive", flush=True)


if __name__ == "__main__":
    main()
