"""Everything flowscan does on a GPU, checked in one command that fits a lent machine's time.

    python benchmarks/gpu_check.py --out DIR            # on a CUDA machine: at most 470 s in all
    python benchmarks/gpu_check.py --out DIR --smoke    # every step at toy size on the CPU (the test suite runs this)

Steps, in order, each in its own process with its own time limit (a step that overruns is
recorded as failed and the next one still runs):

  cuda-tests     the test suite's CUDA tests (the producer with CUDA graphs, transfer on CUDA)
  bench-produce  benchmarks/bench_produce.py: ResNet-20 on 62,500 CIFAR-shaped images (50,000 to
                 train), 2 rounds of 1 epoch, flowscan's producer against the open_lth-style loop,
                 and 3 seeds one at a time against 3 seeds packed into one model
  pipeline       produce -> analyze -> lmc -> sharpness (with --probe) -> transfer on a small archive
  cpu-vs-device  the same small archive made on the CPU and on the device: densities must agree
                 exactly, test accuracies within ACCURACY_TOLERANCE (bf16 autocast on CUDA)

It writes DIR/gpu_check.json (one entry per step: name, status passed/failed/skipped, seconds,
figures, the command and the end of its output) and DIR/gpu_check.md (a short summary), and
exits 1 when a step failed. It needs only what `pip install -c constraints-cpu.txt -e '.[test]'`
installs (and a CUDA build of torch where there is a GPU), and runs from the checkout without
installing flowscan.

On a lent GPU machine, which has torch and most packages but reaches no registry, the packages it
lacks travel as wheels (`--wheels DIR` installs them first, with no index):

    # here, once: the wheels for the machine's Python (3.12, x86-64), into an ignored folder
    python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu-wheels \
        polars polars-runtime-32 isal
    # there, in one device call carrying .gpu-wheels (about 55 MB):
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --wheels .gpu-wheels --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ACCURACY_TOLERANCE = 0.03   # test accuracy, CPU fp32 against bf16 autocast on the device
CALIBRATION_SECONDS = 0.035   # `calibrate()` on a quiet 2-core machine of the kind the limits were set on
READING = {   # what each step's figures mean, for gpu_check.md
    "cuda-tests": "the CUDA tests passed (the producer with CUDA graphs; transfer on CUDA matching its recorded "
                  "tickets); skipped without a GPU",
    "bench-produce": "images/s of each setting and its ratio to the open_lth-style loop (above 1: faster); "
                     "packed_over_one_at_a_time above 1 means packing the seeds pays on this device",
    "pipeline": "rows written by each table (none may be empty) and round 0's top Hessian eigenvalue",
    "cpu-vs-device": "the same archive made on the CPU and the device: densities equal, test accuracies within "
                     "the tolerance (bf16 autocast)",
}
SMALL = ["--model", "mlp", "--data", "digits", "--epochs", "4", "--batch-size", "64", "--lr", "0.05"]


def _run(command: list[str], limit: float, cwd: Path = REPO) -> tuple[int | None, str, float]:
    """(exit status or None on a timeout, stdout+stderr, seconds)."""
    began = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=limit, env=env)
        return done.returncode, done.stdout + done.stderr, time.perf_counter() - began
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return None, out + f"\n(killed after {limit:.0f} s)", time.perf_counter() - began


def _flowscan(*args: str) -> list[str]:
    return [sys.executable, "-m", "flowscan", *args]


def calibrate() -> float:
    """Seconds of a fixed bit of Python and numpy work: how fast this machine is right now."""
    import numpy as np

    best = float("inf")
    for _ in range(3):
        began = time.perf_counter()
        total = 0
        for i in range(1_000_000):
            total += i
        a = np.ones((384, 384), np.float32)
        for _ in range(20):
            a = a @ a * 1e-3
        best = min(best, time.perf_counter() - began)
    return best


class Kit:
    def __init__(self, out: Path, smoke: bool, device: str, time_scale: float = 1.0):
        self.out, self.smoke, self.device, self.time_scale = out, smoke, device, time_scale
        self.steps: list[dict] = []

    def step(self, name: str, limit: float, commands: list[list[str]], figures=None, skip: str | None = None):
        """Run `commands` in order within `limit` seconds in all; `figures(output)` -> dict."""
        entry = {"name": name, "status": "skipped" if skip else "passed", "seconds": 0.0, "figures": {},
                 "commands": [" ".join(c) for c in commands], "output_tail": "", "limit_seconds": limit}
        if skip:
            entry["reason"] = skip
        else:
            outputs = []
            for command in commands:
                remaining = limit - entry["seconds"]
                code, output, seconds = _run(command, max(1.0, remaining))
                entry["seconds"] += seconds
                outputs.append(output)
                if code != 0:
                    entry["status"] = "failed"
                    entry["reason"] = "timed out" if code is None else f"exit status {code}: {' '.join(command[:6])}"
                    break
            text = "\n".join(outputs)
            entry["output_tail"] = text[-4000:]
            if entry["status"] == "passed" and figures is not None:
                try:
                    entry["figures"] = figures(text)
                except Exception as exc:  # noqa: BLE001 - a check that fails is a failed step, with why
                    entry["status"], entry["reason"] = "failed", f"{type(exc).__name__}: {exc}"
        self.steps.append(entry)
        print(f"{name:<14} {entry['status']:<8} {entry['seconds']:7.1f} s  "
              f"{entry.get('reason', '')}{json.dumps(entry['figures']) if entry['figures'] else ''}", flush=True)
        self.write()

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        report = {"smoke": self.smoke, "device": self.device, "python": sys.version.split()[0],
                  "torch": _torch_version(), "time_scale": self.time_scale, "steps": self.steps}
        (self.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
        lines = [f"# flowscan GPU check ({'smoke, CPU' if self.smoke else self.device})", "",
                 f"torch {report['torch']}, Python {report['python']}", "",
                 "| step | status | seconds | figures |", "|---|---|---|---|"]
        for s in self.steps:
            figs = ", ".join(f"{k} {v}" for k, v in s["figures"].items()) or s.get("reason", "")
            lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {figs} |")
        lines += ["", f"Time limits were scaled by {self.time_scale:.2f} for this machine (`--time-scale`).", "",
                  "## Reading the figures", ""]
        lines += [f"- **{name}**: {text}" for name, text in READING.items()]
        failed = [s["name"] for s in self.steps if s["status"] == "failed"]
        lines += ["", "## Next", ""]
        if self.smoke:
            lines.append("- This was the CPU smoke run. On a GPU machine: `PYTHONUNBUFFERED=1 python3 "
                         "benchmarks/gpu_check.py --wheels .gpu-wheels --out $OUT` (one call, about 8 minutes), "
                         "then put the bench-produce figures in the README (Making checkpoints) and, if packing is "
                         "slower there (packed_over_one_at_a_time below 1), flip the packing default.")
        else:
            lines.append("- Put the bench-produce figures in the README (Making checkpoints) and the closing note; "
                         "if packed_over_one_at_a_time is below 1, make one-at-a-time the default on this device.")
        if failed:
            lines.append(f"- Failed: {', '.join(failed)}. Each step's command and the end of its output are in "
                         "gpu_check.json; a step that timed out on a busy machine can run again with a larger "
                         "`--time-scale`.")
        (self.out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def _torch_version() -> str:
    try:
        import torch
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
        return f"{torch.__version__} (CUDA {torch.version.cuda}, {gpu})"
    except Exception as exc:  # noqa: BLE001
        return f"unavailable: {exc}"


def bench_figures(text: str) -> dict:
    """images/s and the ratio of each bench_produce.py setting, and packed seeds against one at a time."""
    rows = re.findall(r"^(open_lth-style baseline, batch \d+|flowscan, batch \d+|"
                      r"flowscan, \d+ seeds (?:packed|one at a time), batch \d+)"
                      r"\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", text, re.M)
    if not rows:
        raise ValueError("bench_produce.py printed no table")
    figures = {name: {"images_per_s": int(ips), "seconds": float(sec), "test_acc": float(acc), "ratio": float(ratio)}
               for name, ips, sec, acc, ratio in rows}
    packed = [v["images_per_s"] for k, v in figures.items() if " seeds packed" in k]
    alone = [v["images_per_s"] for k, v in figures.items() if " seeds one at a time" in k]
    if packed and alone:
        figures["packed_over_one_at_a_time"] = round(packed[0] / max(alone[0], 1), 2)
    return figures


def pipeline_figures(out: Path):
    def figures(_text: str) -> dict:
        import polars as pl

        found = {name: pl.read_parquet(out / f"{name}.parquet").height
                 for name in ("rounds", "lmc_summary", "sharpness", "fraction_probe", "transfer")}
        empty = [k for k, v in found.items() if not v]
        if empty:
            raise ValueError(f"empty tables: {', '.join(empty)}")
        sharp = pl.read_parquet(out / "sharpness.parquet")
        return {"table_rows": found, "lambda_max_round0": round(float(sharp.sort("round")["lambda_max"][0]), 4)}
    return figures


def compare_figures(cpu: Path, device: Path):
    def figures(_text: str) -> dict:
        rounds = sorted(p.name for p in (cpu / "seed_0").glob("round_*"))
        if rounds != sorted(p.name for p in (device / "seed_0").glob("round_*")):
            raise ValueError("the two archives hold different rounds")
        worst, densities = 0.0, []
        for name in rounds:
            a = json.loads((cpu / "seed_0" / name / "round.json").read_text())
            b = json.loads((device / "seed_0" / name / "round.json").read_text())
            if a["density"] != b["density"]:
                raise ValueError(f"{name}: density {a['density']} on the CPU, {b['density']} on the device")
            densities.append(a["density"])
            worst = max(worst, abs(a["metrics"]["test_accuracy"] - b["metrics"]["test_accuracy"]))
        if worst > ACCURACY_TOLERANCE:
            raise ValueError(f"test accuracies differ by {worst:.4f} > {ACCURACY_TOLERANCE}")
        return {"rounds": len(rounds), "densities_equal": True, "max_accuracy_difference": round(worst, 4),
                "tolerance": ACCURACY_TOLERANCE}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="every step at toy size on the CPU")
    parser.add_argument("--wheels", type=Path, help="install the wheels in this folder first (no index, no deps)")
    parser.add_argument("--time-scale", type=float, default=None,
                        help="multiply every step's time limit by this (default: with --smoke, measured from how "
                             "fast this machine runs a fixed bit of work now, at least 1; else 1)")
    args = parser.parse_args()
    if args.wheels:
        wheels = sorted(str(p) for p in args.wheels.glob("*.whl"))
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", *wheels],
                       check=True)
    try:
        import torch
        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    device = "cpu" if args.smoke or not cuda else "cuda"
    work = args.out / "work"
    shutil.rmtree(work, ignore_errors=True)
    # seconds per step: at most 470 in all on a GPU, so the kit fits a lent machine's 10-minute call;
    # the smoke run's limits grow on a slow or busy machine (a fixed 120 s killed bench-produce on one)
    scale = args.time_scale or (max(1.0, calibrate() / CALIBRATION_SECONDS) if args.smoke else 1.0)
    kit = Kit(args.out, args.smoke, device, round(scale, 2))
    limits = {k: v * scale for k, v in (dict(tests=60, bench=120, pipeline=120, compare=90) if args.smoke else
                                        dict(tests=70, bench=220, pipeline=120, compare=60)).items()}

    kit.step("cuda-tests", limits["tests"], [[sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                  "tests/test_produce.py::test_gpu_path_with_cuda_graphs",
                                  "tests/test_transfer.py::test_transfer_on_cuda_matches_the_recorded_tickets"]],
             skip=None if cuda else "no CUDA device (the tests would only skip)")
    bench = ([sys.executable, "benchmarks/bench_produce.py", "--images", "512", "--epochs", "1", "--rounds", "1",
              "--batch", "128", "--seeds", "2", "--device", "cpu"] if args.smoke else
             [sys.executable, "benchmarks/bench_produce.py", "--images", "62500", "--epochs", "1", "--rounds", "2",
              "--seeds", "3", "--device", device])
    kit.step("bench-produce", limits["bench"], [bench], bench_figures)

    archive, tables = work / "archive", work / "tables"
    rounds = "3" if args.smoke else "4"
    kit.step("pipeline", limits["pipeline"], [
        _flowscan("produce", *SMALL, "--rounds", rounds, "--seeds", "2", "--device", device, "-o", str(archive), "-q"),
        _flowscan("analyze", str(archive), "-o", str(tables), "-q"),
        _flowscan("lmc", str(archive), "-o", str(tables), "--points", "3", "--device", device, "-q"),
        _flowscan("sharpness", str(archive), "-o", str(tables), "--subset", "128", "--max-iter", "5",
                  "--probe", "0.5", "--device", device, "-q"),
        _flowscan("transfer", str(archive), str(archive), "--rounds", "2", "--seeds", "1", "--device", device,
                  "-o", str(tables), "-q"),
    ], pipeline_figures(tables))

    on_cpu, on_device = work / "cpu", work / "device"
    kit.step("cpu-vs-device", limits["compare"], [
        # two seeds: on a GPU they are trained packed, on the CPU one at a time
        _flowscan("produce", *SMALL, "--rounds", "3", "--seeds", "2", "--device", "cpu", "-o", str(on_cpu), "-q"),
        _flowscan("produce", *SMALL, "--rounds", "3", "--seeds", "2", "--device", device, "-o", str(on_device), "-q"),
    ], compare_figures(on_cpu, on_device))

    failed = [s["name"] for s in kit.steps if s["status"] == "failed"]
    print(f"wrote {args.out / 'gpu_check.json'} and gpu_check.md; "
          + (f"failed: {', '.join(failed)}" if failed else "no step failed"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
