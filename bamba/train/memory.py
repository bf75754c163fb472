"""Keep freed memory inside the training process: a caching allocator for CPU steps on glibc.

A training step frees and re-allocates the same large temporaries every time (activations,
logits and their gradients, the embedding's dense gradient). glibc serves blocks above a
threshold (128 KiB, growing to 32 MiB) with a fresh ``mmap`` and returns them with ``munmap``,
and trims the heap top when it frees: each step then faults in and zeroes hundreds of
thousands of new pages in the kernel, a noticeable part of a CPU step
(benchmarks/README.md#training).

``retain_freed_memory`` turns both off (``M_MMAP_MAX = 0``: every block comes from the heap;
``M_TRIM_THRESHOLD`` = the maximum: the heap is never shrunk). Freed blocks are then reused by
the next step, as PyTorch's CUDA caching allocator does on a GPU. The cost: the process keeps
its peak footprint (resident memory stays at the high-water mark of a step instead of falling
between steps). Other C libraries (musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc <malloc.h>


@functools.cache
def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (process-wide, once). False where the C library
    is not glibc or refuses an option."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # mallopt returns 1 on success; an int of -1 is read as SIZE_MAX: never trim.
    applied = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))
    if not applied:
        log.warning("glibc refused the allocator settings; freed memory goes back to the kernel")
    return applied
