"""A stand-in reduce task whose process dies on round 2 (for the worker-isolation test; it
lives in its own module so that spawned worker processes can import it)."""

import os
import signal


def reduce_or_die(rnd, names, verify=True):
    if rnd.index == 2:
        os.kill(os.getpid(), signal.SIGSEGV)
    return f"reduced {rnd.index}"


def reduce_hang_or_die(rnd, names, verify=True):
    """Round 1 never returns (a library loop that holds the GIL), round 2 crashes, the rest reduce."""
    if rnd.index == 1:
        while True:
            pass
    return reduce_or_die(rnd, names, verify)
