"""Training cost to a sparse matching ticket: the adaptive schedule against fixed 20 %, same run.

    python benchmarks/bench_adaptive.py --model lenet --data mnist5k --target 0.05 --seeds 3

For each seed and schedule, IMP runs until the density is at most `--target`; the cost is the
total number of training steps (and seconds) spent until the first round that is both at or
below the target density and matching (test error within `--tolerance` of the dense
network's). The adaptive schedule's LMC evaluations are timed separately.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flowscan.produce.imp import IMPConfig  # noqa: E402
from flowscan.produce.runner import produce  # noqa: E402


def cost_to_target(reports, target: float, tolerance: float):
    dense_error = 1 - reports[0].metrics["test_accuracy"]
    steps = seconds = lmc_seconds = 0.0
    for r in reports:
        steps += r.metrics["train_steps"]
        seconds += r.metrics["train_seconds"]
        lmc_seconds += r.metrics.get("lmc_seconds", 0.0)
        error = 1 - r.metrics["test_accuracy"]
        if r.density <= target and error <= dense_error + tolerance:
            return dict(steps=steps, seconds=seconds, lmc_seconds=lmc_seconds, rounds=r.round + 1,
                        density=r.density, accuracy=r.metrics["test_accuracy"], dense=1 - dense_error)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="lenet")
    p.add_argument("--data", default="mnist5k")
    p.add_argument("--target", type=float, default=0.05)
    p.add_argument("--tolerance", type=float, default=0.01)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=float, default=8)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-rounds", type=int, default=30)
    p.add_argument("--rewind", type=float, default=0.1, help="rewind point (both schedules)")
    p.add_argument("--barrier-tolerance", type=float, default=0.01)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for schedule in ("global", "adaptive"):
            cfg = IMPConfig(model=args.model, data=args.data, rounds=args.max_rounds, prune_fraction=0.2,
                            schedule=schedule, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                            weight_decay=1e-4, target_density=args.target, match_tolerance=args.tolerance,
                            rewind=args.rewind, barrier_tolerance=args.barrier_tolerance)
            reports = produce(cfg, list(range(args.seeds)), Path(tmp) / schedule, args.device)
            results[schedule] = [cost_to_target([r for r in reports if r.seed == s], args.target, args.tolerance)
                                 for s in range(args.seeds)]
    print(f"{args.model} on {args.data}, rewind {args.rewind}, barrier tolerance {args.barrier_tolerance}: target density {args.target}, matching = within "
          f"{args.tolerance:.3f} of dense error, {args.epochs} epochs per round, {args.seeds} seeds")
    print(f"{'schedule':<10} {'seed':>4} {'rounds':>6} {'steps':>7} {'train s':>8} {'lmc s':>6} {'density':>8} "
          f"{'acc':>7} {'dense':>7}")
    for schedule, rows in results.items():
        for seed, r in enumerate(rows):
            if r is None:
                print(f"{schedule:<10} {seed:>4}   no matching ticket at the target density")
                continue
            print(f"{schedule:<10} {seed:>4} {r['rounds']:>6} {r['steps']:>7.0f} {r['seconds']:>8.1f} "
                  f"{r['lmc_seconds']:>6.1f} {r['density']:>8.4f} {r['accuracy']:>7.4f} {r['dense']:>7.4f}")
    fixed = [r["steps"] for r in results["global"] if r]
    adaptive = [r["steps"] for r in results["adaptive"] if r]
    if fixed and adaptive:
        saving = 1 - statistics.mean(adaptive) / statistics.mean(fixed)
        print(f"mean training steps: fixed {statistics.mean(fixed):.0f}, adaptive {statistics.mean(adaptive):.0f} "
              f"({100 * saving:.0f} % less)")


if __name__ == "__main__":
    main()
