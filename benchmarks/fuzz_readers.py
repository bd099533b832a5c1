"""Long mutation-fuzzing runs over every reader (the test suite runs a small budget).

    python benchmarks/fuzz_readers.py --cases 10000                 # every format
    python benchmarks/fuzz_readers.py --cases 2000 --formats legacy npz --start 50000

Prints, per format, how many cases were read identically, read with changed data, refused
with a named error, raised an unnamed exception, hung (over --timeout seconds) or crashed the
reading process, and the case numbers of every defect (re-create one with
`fuzzing.make_case(seed_run, folder, format, number)`). Exits 1 if any defect was found, or if
a flipped byte of a zip checkpoint changed its data without an error.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import fuzzing  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=1000, help="cases per format")
    ap.add_argument("--formats", nargs="+", default=list(fuzzing.FORMATS), choices=fuzzing.FORMATS)
    ap.add_argument("--start", type=int, default=0, help="first case number (cases are deterministic)")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per case before it counts as a hang")
    args = ap.parse_args()
    examples: dict = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        counts = fuzzing.run(Path(work), args.formats, args.cases, args.timeout, args.start, examples)
    print(f"{'format':14} " + " ".join(f"{o:>9}" for o in fuzzing.OUTCOMES))
    for fmt in args.formats:
        print(f"{fmt:14} " + " ".join(f"{counts[fmt][o]:9d}" for o in fuzzing.OUTCOMES))
    print(f"{sum(sum(c.values()) for c in counts.values())} cases in {time.perf_counter() - t0:.0f} s")
    for fmt, cases in examples.items():
        print(f"{fmt}: defects at cases {cases[:20]}")
    return 1 if examples else 0


if __name__ == "__main__":
    sys.exit(main())
