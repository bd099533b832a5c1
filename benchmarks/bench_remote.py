"""Remote reading: bytes fetched and wall time against a local HTTP server (with and without
Range support) and moto's S3 server, compared with the local scan of the same archive.

    python benchmarks/bench_remote.py                       # 3 rounds x 2 layers of 8 MiB, both layouts
    python benchmarks/bench_remote.py --size 2048 --rounds 5 --no-s3

Prints, per layout and store: what `inspect` fetched (headers only), what `analyze --select enc`
fetched (half the tensors), what a full `analyze` fetched, against the archive's size, with the
number of requests the HTTP server answered. Loopback has no latency, so the times measure the
client's overhead, not a network.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from servers import big_run, file_server, s3_server, upload  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024, help="rows of each 2048-column float32 layer (1024: 8 MiB)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-s3", action="store_true", help="skip the moto S3 server")
    args = ap.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from flowscan import pipeline
    from flowscan.cli import main as cli
    from flowscan.io import location

    def run(*argv):
        location._STORES.clear()   # each command as a fresh process would run it: no listings or copies kept
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
            try:
                cli([str(a) for a in argv], standalone_mode=False)
            except SystemExit:
                pass

    work = Path(tempfile.mkdtemp(prefix="flowscan-bench-remote-"))
    st, pt = big_run(work / "archive", args.rounds, (args.size, 2048))
    layouts = {"safetensors": st, "prune-style": pt}
    print(f"{'layout':<12} {'store':<14} {'step':<16} {'fetched':>12} {'of archive':>10} {'requests':>9} {'time':>7}")
    for name, folder in layouts.items():
        size = sum(p.stat().st_size for p in folder.iterdir())
        t = timed(lambda: pipeline.analyze(folder))
        print(f"{name:<12} {'local':<14} {'analyze':<16} {'':>12} {'':>10} {'':>9} {t:6.2f}s")
        for ranges in (True, False):
            with file_server(work / "archive", ranges=ranges) as server:
                url = f"{server.url}/{folder.name}/"
                for step, argv in (("inspect", ("inspect", url, "-q")),
                                   ("analyze --select", ("analyze", url, "-o", work / "o1", "-q", "--select", "enc",
                                                         "--no-cache")),
                                   ("analyze", ("analyze", url, "-o", work / "o2", "-q", "--no-cache"))):
                    server.sent = server.requests = 0
                    t = timed(lambda: run(*argv))
                    store = "http" if ranges else "http no-Range"
                    print(f"{name:<12} {store:<14} {step:<16} {server.sent:>12,} {server.sent / size:>9.1%} "
                          f"{server.requests:>9} {t:6.2f}s")
    if not args.no_s3:   # one server for the process: fsspec keeps one client per endpoint
        with s3_server() as endpoint:
            upload(endpoint, work / "archive", "bench")
            for name, folder in layouts.items():
                t = timed(lambda: run("analyze", f"s3://bench/{folder.name}", "-o", work / "o3", "-q", "--no-cache"))
                print(f"{name:<12} {'s3 (moto)':<14} {'analyze':<16} {'':>12} {'':>10} {'':>9} {t:6.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
