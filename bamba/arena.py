"""One buffer in transparent huge pages (``bamba.huge_pages``) for a model's weights (CPU
inference): a decode step streams every weight once.

``WeightArena`` lays out a model's parameters and buffers in module order (the order a forward
pass reads them), each 64-byte aligned; ``place`` copies a tensor into its slot.
``from_pretrained`` loads straight into one, so no second copy of the weights is ever held;
``pack_weights`` moves an existing model's weights into one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bamba.huge_pages import huge_page_buffer

ALIGN = 64


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
