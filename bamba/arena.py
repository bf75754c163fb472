"""One buffer in transparent huge pages for a model's weights (CPU inference).

A decode step streams every weight once; from 4 KiB pages the CPU walks page tables for every
4 KiB of a weight stream (twice under a hypervisor), and its prefetchers stop at every page
edge; 2 MiB pages remove most of both (benchmarks/README.md#model-core). Linux gives
anonymous memory huge pages where ``madvise(MADV_HUGEPAGE)`` asks for them
(``/sys/kernel/mm/transparent_hugepage/enabled`` = always or madvise); elsewhere the buffer is
ordinary memory and everything works the same.

``WeightArena`` lays out a model's parameters and buffers in module order (the order a forward
pass reads them), each 64-byte aligned; ``place`` copies a tensor into its slot.
``from_pretrained`` loads straight into one, so no second copy of the weights is ever held;
``pack_weights`` moves an existing model's weights into one.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable

import torch
from torch import nn

HUGE_PAGE = 2 << 20
ALIGN = 64


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


class WeightArena:
    """Slots for named tensors of given shapes and dtypes in one huge-page buffer."""

    def __init__(self, layout: list[tuple[str, torch.Size, torch.dtype]]):
        self.slots: dict[str, tuple[int, torch.Size, torch.dtype]] = {}
        offset = 0
        for name, shape, dtype in layout:
            self.slots[name] = (offset, shape, dtype)
            offset += -(-shape.numel() * dtype.itemsize // ALIGN) * ALIGN
        self.buffer = huge_page_buffer(offset)

    @classmethod
    def for_model(cls, model: nn.Module,
                  dtype_of: Callable[[str, torch.Tensor], torch.dtype]) -> "WeightArena":
        """Slots for ``model``'s parameters and buffers (shared ones once), in module order;
        ``dtype_of(name, tensor)`` gives each slot's dtype (the tensor may be on meta)."""
        return cls([(name, t.shape, dtype_of(name, t)) for name, t in _tensors(model)])

    def place(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Copy ``tensor`` (cast to the slot's dtype) into slot ``name``; return the slot."""
        offset, shape, dtype = self.slots[name]
        if tensor.shape != shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)}, expected {tuple(shape)}")
        slot = self.buffer[offset:offset + shape.numel() * dtype.itemsize].view(dtype).view(shape)
        return slot.copy_(tensor)


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*model.named_parameters(), *model.named_buffers()]


@torch.no_grad()
def pack_weights(model: nn.Module) -> nn.Module:
    """Move every CPU parameter and buffer of ``model`` into one ``WeightArena``, one tensor at
    a time (the old storage is freed as it goes); other devices are left alone."""
    tensors = [(name, t) for name, t in _tensors(model) if t.device.type == "cpu"]
    if not tensors:
        return model
    arena = WeightArena([(name, t.shape, t.dtype) for name, t in tensors])
    for name, tensor in tensors:
        tensor.data = arena.place(name, tensor)
    return model
