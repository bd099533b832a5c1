"""flowscan lmc against the plain loop on the same pairs of rounds, in one run.

    python benchmarks/bench_landscape.py                     # LeNet-5 on Fashion-MNIST if Debian's
                                                             # dataset-fashion-mnist is installed
    python benchmarks/bench_landscape.py --rounds 4 --points 5 --data synthetic-images:1x28x28:2000

Makes (once, in --work) a LeNet-5 archive with `flowscan produce` (--seeds x --rounds), then times,
on the CPU with the thread policy flowscan chooses for torch (flowscan/cpu.py):

  plain     the loop a researcher writes first: each round loaded and its test error measured,
            then for every pair of successive rounds and every alpha one model gets the point's
            weights (load_state_dict) and the test set goes through it one batch at a time, the
            ends included (each round is an end of two pairs), the model as built
  flowscan  landscape.analysis.lmc_tables: the same pairs and alphas; the stored ends' errors
            reused, convolutions in channels-last layout (flowscan/train/lmc.py)

and prints both wall times, the speed-up, and the largest difference between their errors and
losses over every (pair, alpha): the goal was >= 3x at identical errors.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
FASHION = Path("/usr/share/datasets/fashion-mnist")


def build(work: Path, data: str, seeds: int, rounds: int, epochs: float) -> Path:
    archive = work / f"lenet-{data.replace('/', '_').replace(':', '_')}-s{seeds}-r{rounds}-e{epochs}"
    if not (archive / f"seed_{seeds - 1}" / f"round_{rounds - 1:04d}" / "round.json").is_file():
        subprocess.run([sys.executable, "-m", "flowscan", "produce", "--model", "lenet", "--data", data,
                        "--rounds", str(rounds), "--seeds", str(seeds), "--epochs", str(epochs), "-q",
                        "-o", str(archive)], check=True, cwd=REPO)
    return archive


def plain_evaluate(model, data, batch_size: int = 1000) -> tuple[float, float]:
    """(test error, mean test loss): the model as built, the test set one batch at a time."""
    import torch
    import torch.nn.functional as F

    model.eval()
    wrong, loss, n = 0, 0.0, len(data.y_test)
    with torch.no_grad():
        for i in range(0, n, batch_size):
            logits = model(data.x_test[i:i + batch_size]).float()
            y = data.y_test[i:i + batch_size]
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            wrong += int((logits.argmax(1) != y).sum())
    return wrong / n, loss / n


def plain(archive: Path, points: int) -> dict:
    """(run, round, alpha) -> (error, loss), the plain way."""

    from flowscan.landscape import archive as rounds_of
    from flowscan.landscape.analysis import Setup, _model_and_data, runs_below
    from flowscan.train import lmc

    out, alphas = {}, lmc.alpha_grid(points)
    for run in runs_below(archive, Setup()):
        model = data = None
        before = None
        for rs in rounds_of.iter_rounds(run):
            if model is None:
                model, data, _recipe = _model_and_data(run, Setup(), {}, {k: tuple(v.shape) for k, v in rs.state.items()},
                                                       None)
            rounds_of.load_into(model, rs, "cpu")
            plain_evaluate(model, data)   # the accuracy check every landscape command makes
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if before is not None:
                for alpha in alphas:
                    model.load_state_dict(lmc.point_state(before[1], state, alpha, {}))
                    out[(run.name, before[0], float(alpha))] = plain_evaluate(model, data)
            before = (rs.index, state)
    return out


def flowscan_lmc(archive: Path, points: int) -> dict:
    from flowscan.landscape.analysis import Setup, lmc_tables

    curves, _summary = lmc_tables(archive, Setup(), points)
    return {(r, n, a): (e, lo) for r, n, a, e, lo in curves.iter_rows()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/flowscan-bench/landscape"))
    parser.add_argument("--data", default=f"fashion-mnist:{FASHION}:6000" if FASHION.is_dir()
                        else "synthetic-images:1x28x28:6000")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--points", type=int, default=11)
    args = parser.parse_args()
    from flowscan import cpu

    print(cpu.configure_torch_threads())
    archive = build(args.work, args.data, args.seeds, args.rounds, args.epochs)
    timings, results = {}, {}
    for name, method in (("plain", plain), ("flowscan", flowscan_lmc)) * 2:   # twice, in turns: the best counts
        start = time.perf_counter()
        results[name] = method(archive, args.points)
        timings[name] = min(timings.get(name, float("inf")), time.perf_counter() - start)
    pairs = {(r, n) for r, n, _a in results["plain"]}
    assert results["plain"].keys() == results["flowscan"].keys()
    worst_error = max(abs(results["plain"][k][0] - results["flowscan"][k][0]) for k in results["plain"])
    worst_loss = max(abs(results["plain"][k][1] - results["flowscan"][k][1]) for k in results["plain"])
    print(f"archive: {archive.name}; {len(pairs)} pairs x {args.points} points; {os.cpu_count()} cores")
    print(f"plain loop   {timings['plain']:8.2f} s")
    print(f"flowscan lmc {timings['flowscan']:8.2f} s   = {timings['plain'] / timings['flowscan']:.2f} x the plain loop")
    print(f"largest difference over every (pair, alpha): error {worst_error:.3g}, loss {worst_loss:.3g}")


if __name__ == "__main__":
    main()
