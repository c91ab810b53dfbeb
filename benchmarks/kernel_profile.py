"""Where a GPU's time goes: the kernels that ran while ``fn`` ran, grouped by name, with their total device
time; ``busy_ms`` against ``wall_ms`` says how long the GPU idled (launch gaps, waits on the host)."""

from __future__ import annotations

import time

import torch
from torch.autograd import DeviceType


def kernel_times(fn, top: int = 12) -> dict:
    """Run ``fn`` once under torch.profiler; the ``top`` kernels by device time (ms) and the totals."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels = []
    for event in prof.key_averages():
        if event.device_type == DeviceType.CUDA:  # kernels, copies and memsets, not the ops that launched them
            device_us = getattr(event, "self_device_time_total", None)  # older PyTorch: self_cuda_time_total
            device_us = getattr(event, "self_cuda_time_total", 0) if device_us is None else device_us
            kernels.append((device_us / 1e3, event.count, event.key))
    kernels.sort(reverse=True)
    return {"wall_ms": round(1e3 * wall, 1), "busy_ms": round(sum(ms for ms, _, _ in kernels), 1),
            "top_kernels": [{"ms": round(ms, 2), "calls": calls, "name": name[:90]} for ms, calls, name in kernels[:top]]}
