"""How many CPU threads a stage should run: the cores this process may use, those other processes keep busy
now, and a scoped torch thread count. Training, the judge and the embed stage all size their work by these."""

from __future__ import annotations

import contextlib
import logging
import os
import time

import torch


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def free_cpu_threads(sample_seconds: float = 0.3) -> int:
    """CPU threads worth using now: the cores this process may run on, minus those other processes keep busy.

    Small convolutions synchronise their threads many times per step; a thread that shares its core with
    a busy process makes the others spin, and two threads then ran 10-50x slower than one on a loaded
    2-core machine. So a CPU run takes only the cores that look free when it starts. "Busy" is measured
    over ``sample_seconds`` from ``/proc/stat``, minus this process's own use: the load average would
    still count a stage that ended a minute ago and starve the next one.
    """
    cores = usable_cores()
    try:
        busy_others = _other_processes_busy_cores(sample_seconds)
    except (OSError, ValueError, IndexError):  # no /proc (not Linux): fall back to the load average
        busy_others = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, cores - round(busy_others))


def _other_processes_busy_cores(seconds: float) -> float:
    def sample() -> tuple[int, int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        return sum(fields[:8]) - idle, sum(fields[:8]), int(own[11]) + int(own[12])  # utime + stime

    busy0, total0, own0 = sample()
    time.sleep(seconds)
    busy1, total1, own1 = sample()
    per_core = (total1 - total0) / (os.cpu_count() or 1)  # clock ticks one core had in the interval
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / max(per_core, 1)


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Run the block with ``threads`` intra-op CPU threads (None: leave the setting alone), then restore."""
    before = torch.get_num_threads()
    if threads is not None:
        logging.getLogger("clipgen").info("torch CPU threads: %d", threads)
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
