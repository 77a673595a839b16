"""How many CPU threads torch gets in a command that serves or batches (`--threads`).

torch's default is one thread per core it sees. On a small machine that is too many: the process
has other work on the same cores (the server's event loop and tokenizer, the policy's scorers), and
torch's OpenMP threads spin while they wait for each other, so a core taken by anything else stalls
every matmul. Measured on a shared 2-core machine (benchmarks/threads.py, RESULTS.md "Threads"): a
16-token request took several times longer at torch's default of 2 threads than at 1. The default
here leaves one core for the rest of the process: the cores this process may use, minus one, at
least 1, divided among the processes of one host when a launcher starts several (LOCAL_WORLD_SIZE).
On a GPU the model's work is on the device, and the thread count matters little.
"""
from __future__ import annotations

import os
from pathlib import Path


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota (a
    container's `--cpus`), which os.cpu_count() does not see."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def default_threads() -> int:
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, (usable_cores() - 1) // processes)


def set_threads(threads: int | None) -> int:
    """Sets torch's CPU threads to `threads`, or to default_threads() when it is None; returns the number."""
    import torch

    n = threads or default_threads()
    torch.set_num_threads(n)
    return n
