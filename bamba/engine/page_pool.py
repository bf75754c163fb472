"""Hybrid memory manager, bookkeeping only: KV blocks for the attention layers and state slots
for the Mamba layers, sized from one byte budget.

Both pools are ``PagePool``s of integer page ids with reference counts. A page whose count drops
to zero either returns to the free list or, when it carries a prefix-cache key, stays cached and
evictable (least recently used first). Allocation returns ``None`` when the pool cannot serve the
request; the scheduler decides what to do about it. No tensors live here (the runner owns them).
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from bamba.config import BambaConfig


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kv_bytes_per_block(config: BambaConfig, block_size: int, dtype: torch.dtype) -> int:
    """block_size × attention layers × 2 (K and V) × Hkv × D × dtype size."""
    return (block_size * len(config.attn_layer_indices) * 2 * config.num_key_value_heads
            * config.head_dim * dtype_size(dtype))


def state_bytes_per_slot(config: BambaConfig, dtype: torch.dtype, state_dtype: torch.dtype) -> int:
    """Mamba layers × (conv state (K-1)·conv_dim in the model dtype + SSM state H·P·N)."""
    conv = (config.mamba_d_conv - 1) * config.conv_dim * dtype_size(dtype)
    ssm = (config.mamba_n_heads * config.mamba_d_head * config.mamba_d_state
           * dtype_size(state_dtype))
    return len(config.mamba_layer_indices) * (conv + ssm)


@dataclass(frozen=True)
class PoolPlan:
    """How a byte budget is split: page counts and the bytes of one page of each kind."""

    num_blocks: int
    num_slots: int
    block_bytes: int
    slot_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.block_bytes + self.num_slots * self.slot_bytes


def plan_pools(config: BambaConfig, memory_bytes: int, block_size: int, dtype: torch.dtype,
               state_dtype: torch.dtype, max_num_seqs: int, max_model_len: int,
               prefix_caching: bool, spare_slots: int = 0) -> PoolPlan:
    """Split ``memory_bytes`` between state slots and KV blocks, each at its own page size.

    Slots: one per running sequence, plus as many again for prefix-cache snapshots when caching
    is on, plus ``spare_slots`` (speculative decoding's checkpoint of a state), but never more
    than half the budget. The rest becomes KV blocks. A pool whose page has no bytes (no
    attention or no Mamba layers) gets as many pages as it could ever use.
    """
    if memory_bytes <= 0:
        raise ValueError(f"memory budget must be positive, got {memory_bytes} bytes")
    block_bytes = kv_bytes_per_block(config, block_size, dtype)
    slot_bytes = state_bytes_per_slot(config, dtype, state_dtype)
    wanted_slots = max_num_seqs * (2 if prefix_caching else 1) + spare_slots
    blocks_per_seq = math.ceil(max_model_len / block_size)
    if slot_bytes == 0:
        num_slots = wanted_slots
    else:
        num_slots = min(wanted_slots, (memory_bytes // 2) // slot_bytes)
        if num_slots == 0 and slot_bytes <= memory_bytes:
            num_slots = 1
    left = memory_bytes - num_slots * slot_bytes
    num_blocks = max_num_seqs * blocks_per_seq * 2 if block_bytes == 0 else left // block_bytes
    if num_slots < 1 or num_blocks < 1:
        raise ValueError(f"memory budget of {memory_bytes} bytes holds no state slot "
                         f"({slot_bytes} bytes) plus KV block ({block_bytes} bytes)")
    return PoolPlan(num_blocks, num_slots, block_bytes, slot_bytes)


class PagePool:
    """Integer pages with reference counts, a free list and an LRU of cached, unused pages.

    Free pages are handed out lowest id first, so running sequences tend to hold a compact range
    of state slots (the runner then reads a batch's states as one slice instead of a gather).
    """

    def __init__(self, num_pages: int, name: str):
        if num_pages <= 0:
            raise ValueError(f"{name} pool needs at least one page, got {num_pages}")
        self.name = name
        self.num_pages = num_pages
        self._free = list(range(num_pages))  # a heap
        self._refs = [0] * num_pages
        self._key_of: dict[int, Hashable] = {}
        self._page_of: dict[Hashable, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached pages nobody uses

    @property
    def num_free(self) -> int:
        """Pages an allocation may take: never used plus cached-but-evictable."""
        return len(self._free) + len(self._lru)

    @property
    def num_cached(self) -> int:
        return len(self._page_of)

    @property
    def num_in_use(self) -> int:
        return self.num_pages - self.num_free

    def allocate(self, n: int) -> list[int] | None:
        """n fresh pages with one reference each, evicting cached pages if needed; None if the
        pool cannot supply n."""
        if n > self.num_free:
            return None
        pages = []
        for _ in range(n):
            if self._free:
                page = heapq.heappop(self._free)
            else:
                page, _ = self._lru.popitem(last=False)
                del self._page_of[self._key_of.pop(page)]
            self._refs[page] = 1
            pages.append(page)
        return pages

    def acquire(self, page: int) -> None:
        """One more reference to a cached page (a prefix hit)."""
        self._lru.pop(page, None)
        self._refs[page] += 1

    def release(self, pages: list[int]) -> None:
        for page in pages:
            assert self._refs[page] > 0, f"{self.name} page {page} released twice"
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._key_of:
                    self._lru[page] = None
                else:
                    heapq.heappush(self._free, page)

    def register(self, page: int, key: Hashable) -> bool:
        """Give an in-use page a cache key; False if the key or the page already has one."""
        if key in self._page_of or page in self._key_of:
            return False
        self._key_of[page] = key
        self._page_of[key] = page
        return True

    def lookup(self, key: Hashable) -> int | None:
        return self._page_of.get(key)

    def touch(self, page: int) -> None:
        """Mark a cached, unused page as recently used."""
        if page in self._lru:
            self._lru.move_to_end(page)

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def clear_cache(self) -> None:
        """Forget every cached key; unused cached pages become free."""
        for page in list(self._lru):
            heapq.heappush(self._free, page)
        self._lru.clear()
        self._key_of.clear()
        self._page_of.clear()
