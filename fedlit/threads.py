"""How many torch threads a CPU rank uses: all ranks of a node together use at most its cores.

torch's own default is one thread per core in every process, so N ranks on a node would run
N x cores threads that preempt each other. The default here divides the cores this process may
run on (its CPU affinity, which a container or `taskset` narrows) among the node's ranks, less
the cores other jobs keep busy (the 1-minute load average at start-up): on a shared machine a
thread that waits for a preempted sibling costs far more than the thread gains (docs/cli.md
measures 40 times slower rounds). Threads never change the numbers of a CPU run of fedlit's
models, only its speed.
"""

from __future__ import annotations

import os

import torch


def available_cores() -> int:
    """Cores this process may run on (its affinity where the OS has one, else all)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def busy_cores() -> float:
    """Cores other processes keep busy: the 1-minute load average (0 where there is none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def default_cpu_threads(
    local_ranks: int, cores: int | None = None, busy: float | None = None
) -> int:
    """Threads per rank so that local_ranks x threads <= the free cores (at least 1 each)."""
    cores = available_cores() if cores is None else cores
    busy = busy_cores() if busy is None else busy
    free = cores - min(cores - 1, int(busy))
    return max(1, free // max(1, local_ranks))


def set_cpu_threads(configured: int | None, local_ranks: int) -> int:
    """Apply `trainer.cpu_threads` (or the default) to torch; returns the number set."""
    threads = configured or default_cpu_threads(local_ranks)
    torch.set_num_threads(threads)
    return threads


def describe_threads(device_type: str, local_ranks: int) -> str:
    """The start-up panel's row: threads per rank, against the cores they share."""
    threads = torch.get_num_threads()
    cores = available_cores()
    text = (
        f"{threads} torch thread(s) per rank x {local_ranks} rank(s), {cores} core(s), "
        f"load {busy_cores():.1f}"
    )
    if device_type == "cpu" and threads * local_ranks > cores:
        text += " [yellow](oversubscribed: lower trainer.cpu_threads)[/yellow]"
    return text
