"""Keep freed heap memory inside the process, so that a CPU step reuses pages that are already mapped.

A training step on the CPU allocates and frees the same tensors every step: activations, their gradients,
the logits. glibc's malloc hands every block above a size threshold straight back to the kernel (``mmap`` and
``munmap``, or a trim of the heap's top), so the next step faults each page in again and the kernel zeroes it
first. In the shapes demo's transformer step (fp32, 2 cores) that was about a sixth of the CPU time: system
time 5.5 s against 1.6 s over the same 40 steps, with the matrix products and the loss' backward slower too
(``python benchmarks/host_memory.py`` measures it, one process of each kind taking turns). Setting the
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
