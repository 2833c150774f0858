"""proxrl: Proximal Policy Optimization from theory to practice."""
import os as _os
import sys as _sys


def _spinning_threads_wanted(argv: list[str]) -> bool:
    """Whether this process is ``proxrl train ... --threads N`` with N > 1 (console script, control trainer).

    There torch's N threads must wait actively between the update's short ops to help: with OpenMP's
    default wait (spin a moment, then sleep) 2 threads trained HalfCheetah-v5 ~14% faster than 1 on a 2-core
    machine, with ``PASSIVE`` ~30% slower (each op waits for a sleeping thread to wake). benchmarks/README.md
    """
    if len(argv) < 2 or _os.path.basename(argv[0]) != "proxrl" or argv[1] != "train":
        return False
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--threads=") else (
            argv[i + 1] if arg == "--threads" and i + 1 < len(argv) else None)
        if value is not None:
            return value.isdigit() and int(value) > 1
    return False


# PyTorch's OpenMP threads busy-wait by default; on a shared 2-core machine that made small ops ~90x
# slower. Passive waiting costs nothing measurable with one thread and must be set before torch is imported.
# A user's own OMP_WAIT_POLICY wins, and so does a tuned spin (GOMP_SPINCOUNT for GNU OpenMP, KMP_BLOCKTIME
# for LLVM/Intel OpenMP); `proxrl train --threads N>1` keeps OpenMP's default (see above).
if not (_spinning_threads_wanted(_sys.argv) or "GOMP_SPINCOUNT" in _os.environ or "KMP_BLOCKTIME" in _os.environ):
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
