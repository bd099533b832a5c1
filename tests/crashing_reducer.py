"""A stand-in reduce task whose process dies on round 2 (for the worker-isolation test; it
lives in its own module so that spawned worker processes can import it)."""

import os
import signal


def reduce_or_die(rnd, names, verify=True):
    if rnd.index == 2:
        os.kill(os.getpid(), signal.SIGSEGV)
    return f"reduced {rnd.index}"
