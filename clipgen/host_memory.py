"""Keep freed heap memory inside the process, so that a CPU step reuses pages that are already mapped.

A training step on the CPU allocates and frees the same tensors every step: activations, their gradients,
the logits. glibc's malloc hands every block above a size threshold straight back to the kernel (``mmap`` and
``munmap``, or a trim of the heap's top), so the next step faults each page in again and the kernel zeroes it
first. Side by side on 2 AVX2 cores (``python benchmarks/host_memory.py``, one process of each kind taking
turns), glibc's defaults faulted in 3.5-6x as many pages and spent twice the system time; keeping the memory
made the shapes tokenizer's step 1.16x as fast and the transformer's 0.99x and 1.075x in two runs. Setting the
threshold (``M_MMAP_THRESHOLD``, at glibc's upper limit of 32 MiB) and the trim threshold (1 GiB) keeps those
blocks in the process for the next step, as PyTorch's CUDA allocator keeps device memory.

Called where a pipeline step is built. It changes the whole process and cannot be undone, which is why a
library call made from a notebook does not set it. ``CLIPGEN_MALLOC=default`` leaves glibc's defaults; on
other C libraries (musl, macOS, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

OPT_OUT_ENV = "CLIPGEN_MALLOC"
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD = 32 << 20  # blocks up to this size come from the heap; glibc refuses more on 64-bit
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top is returned to the kernel only beyond this
TOP_PAD = 64 << 20  # each time the heap grows, it grows by this much more than asked

_kept = False


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks for reuse (see the module docstring); returns whether it is now set.
    Safe to call more than once and from any thread."""
    global _kept
    if _kept:
        return True
    if os.environ.get(OPT_OUT_ENV, "") == "default" or not sys.platform.startswith("linux"):
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))
    _kept = all(mallopt(option, value) == 1 for option, value in settings)
    return _kept
