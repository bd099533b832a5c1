"""The universality prediction tested: IMP on several tasks, every ticket transferred to every task.

    # CPU, minutes: MNIST-5k, Fashion-MNIST (5k) and a synthetic 28x28 task, MLP, 3 seeds
    python benchmarks/transfer_study.py --fashion /usr/share/datasets/fashion-mnist
    # quick check (digits and synthetic 8x8 only)
    python benchmarks/transfer_study.py --size tiny
    # GPU: CIFAR-10 <-> CIFAR-100 shapes (synthetic), ResNet-20; the 10/100-way heads are filled
    python benchmarks/transfer_study.py --size cifar --device cuda

For each task an IMP archive is made (`produce`), then `flowscan transfer` runs for every
ordered pair (self pairs included: sigma distance 0) into one output folder, so that the tables
join every pair and, from 4 pairs on, give Spearman's rho between sigma distance and transfer
gap. Everything resumes: run it again to finish an interrupted study. Prints the arms per pair
and the correlation.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import polars as pl  # noqa: E402

from flowscan.produce.imp import IMPConfig  # noqa: E402
from flowscan.produce.runner import produce  # noqa: E402
from flowscan.train.trainer import resolve_device  # noqa: E402
from flowscan.produce.transfer import CELLS, Plan, run_transfer  # noqa: E402
from flowscan.stats.transfer import transfer_tables  # noqa: E402


def tasks(size: str, fashion: str | None, images: int | None) -> tuple[str, dict, list[str]]:
    """(model, recipe, data specs) of a study size."""
    if size == "tiny":
        return "mlp", dict(epochs=4, batch_size=64, lr=0.05), ["digits", "synthetic-images:1x8x8:1797"]
    if size == "cifar":
        n = images or 20000
        return "cifar-resnet20", dict(epochs=10, batch_size=256, lr=0.2, augment=True), \
            [f"synthetic-images:3x32x32:{n}:10", f"synthetic-images:3x32x32:{n}:100"]
    specs = ["mnist5k", "synthetic-images:1x28x28:5000"]
    if fashion:
        specs.insert(1, f"fashion-mnist:{fashion}:5000")
    return "mlp", dict(epochs=8, batch_size=128, lr=0.05), specs


def archive_name(spec: str) -> str:
    parts = spec.split(":")
    if parts[0] == "synthetic-images":
        return f"synthetic-{parts[1]}" + (f"-{parts[3]}-classes" if len(parts) > 3 else "")
    return parts[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "mnist", "cifar"), default="mnist")
    parser.add_argument("--fashion", help="Folder of Fashion-MNIST idx files (Debian: dataset-fashion-mnist).")
    parser.add_argument("--out", type=Path, default=Path("transfer-study"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=12, help="IMP rounds per task (0.8^11 = 0.086 density).")
    parser.add_argument("--transfer-rounds", default="4,8,11", help="Source rounds transferred.")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--epochs", type=float, help="Epochs per round (default: the size's).")
    parser.add_argument("--images", type=int, help="--size cifar: images per synthetic task (default 20000).")
    parser.add_argument("--no-self", action="store_true", help="Leave out the pairs of a task with itself.")
    args = parser.parse_args()

    model, recipe, specs = tasks(args.size, args.fashion, args.images)
    if args.epochs:
        recipe["epochs"] = args.epochs
    device = resolve_device(args.device)
    archives = {}
    began = time.perf_counter()
    for spec in specs:
        archives[spec] = args.out / "archives" / archive_name(spec)
        cfg = IMPConfig(model=model, data=spec, rounds=args.rounds, **recipe)
        produce(cfg, list(range(args.seeds)), archives[spec], str(device), parallel=1)
        print(f"[{time.perf_counter() - began:7.1f} s] IMP on {spec}: {archives[spec]}", flush=True)
    rounds = tuple(int(r) for r in args.transfer_rounds.split(","))
    for source in specs:
        for target in specs:
            if args.no_self and source == target:
                continue
            plan = Plan(archives[source], str(archives[target]), rounds, fill_unmatched=args.size == "cifar")
            run_transfer(plan, args.out, device)
            print(f"[{time.perf_counter() - began:7.1f} s] transfer {archives[source].name} -> "
                  f"{archives[target].name}", flush=True)
    frames = transfer_tables(args.out / CELLS)
    with pl.Config(tbl_rows=200, tbl_cols=20, tbl_width_chars=200, float_precision=4):
        summary = frames["transfer_summary"].select("source", "target", "source_round", "arm", "n_seeds", "density",
                                                    "accuracy_mean", "accuracy_sem", "gap_mean", "gap_sem")
        print(summary)
        print(frames["transfer_pairs"].select("source", "target", "gap_mean", "gap_sem", "own_gap_mean",
                                              "sigma_rms", "n_conflicts", "overlap_mean", "chance_mean"))
    print(frames["transfer_correlation"]["statement"][0])
    print(f"total {time.perf_counter() - began:.1f} s on {device}")


if __name__ == "__main__":
    main()
