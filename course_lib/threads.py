"""How many CPU threads PyTorch uses: a deliberate choice, because the default collapses on shared machines.

Measured on a 2-core machine shared with other jobs (docs/benchmarks.md, "CPU threads";
tools/thread_policy.py): one tiny-UNet forward took ~0.3 s on one thread and 3-14 s with PyTorch's
default of one thread per core, because OpenMP's worker threads spin-wait for each other and a
neighbour's job keeps descheduling one of them. Two things prevent that collapse:

* ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads sleep instead of spinning). It only works if set before
  PyTorch is first imported, so ``import course_lib`` sets it when it comes first and nothing else chose;
* few intra-op threads on small machines: :func:`default_threads` is 1 up to 4 cores, then half the
  cores (at most 8). The course's CPU models are small: more threads buy little there.

``COURSE_THREADS=N`` in the environment, or ``python -m course_lib --threads N ...``, overrides the choice.
"""
from __future__ import annotations

import os

ENV_VAR = "COURSE_THREADS"


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. a container's CPU set), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:                                  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def default_threads(cores: int | None = None) -> int:
    """1 thread up to 4 cores, then half the cores, at most 8."""
    cores = usable_cores() if cores is None else cores
    return 1 if cores <= 4 else min(8, cores // 2)


def choose_threads(threads: int | str | None = None) -> int:
    """The thread count to use: ``threads`` if given, else ``$COURSE_THREADS``, else :func:`default_threads`."""
    value = threads if threads is not None else os.environ.get(ENV_VAR) or None
    if value is None:
        return default_threads()
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = 0
    if count < 1:
        source = "--threads" if threads is not None else ENV_VAR
        raise ValueError(f"{source} {value!r}: expected a whole number of threads >= 1")
    return count


def apply_thread_policy(threads: int | str | None = None) -> int:
    """Set PyTorch's intra-op thread count by :func:`choose_threads`; returns the count."""
    import torch

    count = choose_threads(threads)
    torch.set_num_threads(count)
    return count
