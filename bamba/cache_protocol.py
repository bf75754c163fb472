"""What the model asks of an inference cache, and the layout fast paths read keys in.

A contiguous cache (``bamba.cache``) serves ``generate``; the engine's paged cache (KV blocks +
state slots) satisfies the same protocol.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch


class KVLayout(NamedTuple):
    """Where an attention layer's keys and values lie: token row r of KV head g starts at
    element g * head_stride + r * token_stride of its storage."""
    head_stride: int
    token_stride: int


class InferenceCache(Protocol):
    """What the model needs from an inference cache for the rows of the current batch."""

    def mamba_pools(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(conv pool [S, K-1, conv_dim], SSM pool [S, H, P, N], rows): this batch's states are
        ``pool[rows]`` (rows: [B] int64), or the pools themselves, in batch order, when rows is
        None. The model reads them and writes the advanced states back in place."""

    def update_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor,
                  positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, L, Hkv, D] at positions [B, L]; return keys/values for positions
        0..T-1 of every row ([B, T, Hkv, D]), T = 1 + the largest position written."""

    # A cache may also offer the two methods below, for fast paths that write and read keys
    # and values in place:
    #   kv_pages(layer_idx) -> (keys, values, KVLayout): an attention layer's
    #       storage, token row r of KV head g at element g * head_stride + r * token_stride;
    #   token_rows(positions [B, 1]) -> (write [B], read [B, T]): the token rows of this
    #       token and of positions 0..T-1 of every row.
