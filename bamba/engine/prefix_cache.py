"""Prefix caching for hybrids: full KV blocks plus Mamba state snapshots at block boundaries.

A prefix is named by a hash chain over its token blocks: h_i = H(h_{i-1}, tokens of block i).
The KV of block i is cached under h_i in the block pool; the Mamba state after block i (conv +
SSM, a whole state slot) is cached under h_i in the slot pool. A new sequence may resume at
boundary j only if blocks 0..j-1 are all cached and, when the model has Mamba layers, a snapshot
exists at j (attention alone could resume at any cached block; Mamba needs the state there).
Cached pages live in the same pools as running ones and are evicted least recently used first,
so the cache never takes memory a running sequence needs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from bamba.engine.page_pool import PagePool


def block_hashes(token_ids: list[int], block_size: int, num_blocks: int,
                 known: list[bytes] | None = None) -> list[bytes]:
    """The hash chain of the first ``num_blocks`` full blocks; ``known`` extends a computed chain."""
    hashes = list(known or [])
    parent = hashes[-1] if hashes else b""
    for i in range(len(hashes), num_blocks):
        block = np.asarray(token_ids[i * block_size:(i + 1) * block_size], dtype=np.int64)
        assert len(block) == block_size, "only full blocks are hashed"
        parent = hashlib.blake2b(parent + block.tobytes(), digest_size=16).digest()
        hashes.append(parent)
    return hashes


@dataclass(frozen=True)
class PrefixHit:
    """Where a sequence resumes: the cached KV blocks it reuses and the snapshot slot (or None
    when the model has no Mamba layers or nothing is reused)."""

    num_tokens: int
    block_ids: list[int]
    snapshot_slot: int | None


class PrefixCache:
    """Lookup and registration of cached prefixes over the two page pools; hit statistics."""

    def __init__(self, blocks: PagePool, slots: PagePool, block_size: int, has_mamba: bool):
        self.blocks, self.slots = blocks, slots
        self.block_size = block_size
        self.has_mamba = has_mamba
        self.queried_tokens = 0
        self.hit_tokens = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def match(self, hashes: list[bytes]) -> PrefixHit:
        """The longest resumable cached prefix. Acquires a reference to each reused block and to
        the snapshot slot; the caller releases the snapshot once its state is copied."""
        cached = 0
        while cached < len(hashes) and self.blocks.lookup(hashes[cached]) is not None:
            cached += 1
        resume, snapshot = cached, None
        if self.has_mamba:
            while resume > 0:
                snapshot = self.slots.lookup(hashes[resume - 1])
                if snapshot is not None:
                    break
                resume -= 1
        block_ids = [self.blocks.lookup(h) for h in hashes[:resume]]
        for page in block_ids:
            self.blocks.acquire(page)
        if snapshot is not None:
            self.slots.acquire(snapshot)
        return PrefixHit(resume * self.block_size, block_ids, snapshot)

    def record(self, hit: PrefixHit, num_tokens: int) -> None:
        """Count one admitted sequence of ``num_tokens`` prompt tokens toward the hit rate."""
        self.queried_tokens += num_tokens
        self.hit_tokens += hit.num_tokens

    def register_blocks(self, block_ids: list[int], hashes: list[bytes], start: int) -> None:
        """Name the full blocks ``start..len(hashes)-1`` of a sequence by their hashes."""
        for i in range(start, len(hashes)):
            self.blocks.register(block_ids[i], hashes[i])

    def has_snapshot(self, block_hash: bytes) -> bool:
        return self.slots.lookup(block_hash) is not None

    def reset_stats(self) -> None:
        self.queried_tokens = self.hit_tokens = 0
