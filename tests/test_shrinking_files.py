"""A file that shrinks while it is being read (a copy still in progress, a sync tool) is that round's
named error, never a SIGBUS that kills the process: the other runs are analysed and written."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import polars as pl
import pytest
from safetensors.numpy import save_file

from flowscan.io import location

pytestmark = pytest.mark.skipif(location._GUARDS is None, reason="the compiled kernel guards memory maps")

# truncates each round file of the run 'shrinking' just after its header is read, before its tensors are
_DRIVER = textwrap.dedent("""
    import os, sys
    import flowscan.reduce as reduce
    opened = reduce.open_tensors
    def open_then_shrink(rnd, opts):
        found = opened(rnd, opts)
        for path in rnd.files:
            if "shrinking" in str(path):
                os.truncate(path, 4096)
        return found
    reduce.open_tensors = open_then_shrink
    from flowscan.cli import main
    main(sys.argv[1:])
""")


def _run(folder, rounds=3, shape=(512, 512)):
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    for r in range(rounds):
        mask = (rng.random(shape) < 0.8 ** r).astype(np.uint8)
        save_file({"fc.weight": rng.normal(size=shape).astype(np.float32), "fc.weight_mask": mask},
                  str(folder / f"round_{r}.safetensors"))


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_file_truncated_while_mapped_is_a_named_error(tmp_path, jobs):
    root = tmp_path / "runs"
    _run(root / "good")
    _run(root / "shrinking")
    done = subprocess.run([sys.executable, "-c", _DRIVER, "analyze", str(root), "-o", str(tmp_path / "out"), "-q",
                           "--no-cache", "-j", jobs], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])   # not a signal
    runs = {r["run"]: r for r in pl.read_parquet(tmp_path / "out" / "runs.parquet").iter_rows(named=True)}
    assert runs["good"]["status"] == "ok", runs["good"]
    assert runs["shrinking"]["status"] == "error"
    assert "shrank while it was being read" in runs["shrinking"]["error"], runs["shrinking"]["error"]
    assert "round_0.safetensors" in runs["shrinking"]["error"]


def test_an_unguarded_fault_still_reaches_the_previous_handler(tmp_path):
    # a SIGBUS outside any guarded map is not swallowed: the process dies of it as before
    path = tmp_path / "f"
    path.write_bytes(b"\\0" * (1 << 20))
    code = textwrap.dedent(f"""
        import mmap, os, numpy as np
        from flowscan.io.location import map_file   # installs the guard handler
        from pathlib import Path
        guarded = map_file(Path({str(tmp_path / 'g')!r}))
        with open({str(path)!r}, "rb") as f:
            plain = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        os.truncate({str(path)!r}, 0)
        print(int(np.frombuffer(plain, np.uint8)[1 << 19]))
    """)
    (tmp_path / "g").write_bytes(b"\\1" * 8192)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == -7, (done.returncode, done.stdout, done.stderr)   # SIGBUS
