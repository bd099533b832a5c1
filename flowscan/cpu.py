"""CPU threads for torch work (training, evaluation, Hessian products) on a machine that may be shared.

torch's OpenMP threads spin while they wait for each other. With another process busy on one of
the cores, a spinning team loses its time slices to that process and a step can take many times
longer (benchmarks/bench_produce.py --shared-cpu: LeNet on 2 cores, 2,000 against 17,000 images/s).
Two choices, made before torch is imported and only where the user has not made them:

- OMP_WAIT_POLICY=PASSIVE: waiting threads sleep instead of spinning. It costs about a quarter of
  the speed on an idle machine and keeps 4 to 6 times the speed when a core is taken (the figures
  are in the README); set OMP_WAIT_POLICY=ACTIVE on a machine of your own for the difference.
- one thread per core that no other process is using when the work starts (the running processes
  of /proc/stat), so a busy core is not part of the team at all.
"""

from __future__ import annotations

import os
import time


def prefer_passive_waiting() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless set; effective only before torch (its OpenMP) is loaded."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def busy_elsewhere(samples: int = 5, interval: float = 0.02) -> int | None:
    """Processes running or runnable besides this one (the median of a few looks at /proc/stat's
    procs_running); None where the kernel does not say."""
    seen = []
    for _ in range(samples):
        try:
            with open("/proc/stat") as f:
                line = next((ln for ln in f if ln.startswith("procs_running")), None)
        except OSError:
            return None
        if line is None:
            return None
        seen.append(int(line.split()[1]) - 1)
        time.sleep(interval)
    return max(0, sorted(seen)[len(seen) // 2])


def configure_torch_threads() -> str:
    """Set torch's intra-op threads to the free cores (unless OMP_NUM_THREADS says otherwise) and
    say what was chosen, for the user."""
    import torch

    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    if "OMP_NUM_THREADS" in os.environ:
        return f"CPU threads: {torch.get_num_threads()} (OMP_NUM_THREADS), OMP_WAIT_POLICY {policy}"
    total, others = cores(), busy_elsewhere()
    threads = total if others is None else max(1, min(total, total - others))
    torch.set_num_threads(threads)
    busy = "" if not others else f"; {others} other process(es) running"
    return f"CPU threads: {threads} of {total} core(s){busy}, OMP_WAIT_POLICY {policy}"
