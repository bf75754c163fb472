"""Anonymous memory in transparent huge pages (2 MiB), for tensors streamed whole again and
again: a model's weights (``bamba.arena``) and the quantized prefill's dequantized tiles
(``bamba.native.quant_ops``).

From 4 KiB pages the CPU walks page tables for every 4 KiB of a stream (twice under a
hypervisor), and its prefetchers stop at every page edge; 2 MiB pages remove most of both
(benchmarks/README.md#model-core). Linux gives anonymous memory huge pages where
``madvise(MADV_HUGEPAGE)`` asks for them (``/sys/kernel/mm/transparent_hugepage/enabled`` =
always or madvise); elsewhere the buffer is ordinary memory and everything works the same.
"""

from __future__ import annotations

import mmap

import torch

HUGE_PAGE = 2 << 20


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 tensor of ``nbytes`` in anonymous memory advised for huge pages
    (2 MiB-aligned), or from torch's allocator where the platform has no such advice."""
    if nbytes <= 0 or not hasattr(mmap, "MADV_HUGEPAGE") or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.empty(max(nbytes, 0), dtype=torch.uint8)
    size = -(-(nbytes + HUGE_PAGE) // HUGE_PAGE) * HUGE_PAGE  # room to align the start
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # transparent huge pages compiled out: ordinary pages
        pass
    whole = torch.frombuffer(region, dtype=torch.uint8)  # keeps the mapping alive
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start:start + nbytes]
