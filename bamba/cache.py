"""A contiguous, preallocated inference cache for ``generate``: one row per sequence.

Mamba layers keep a conv state [rows, K-1, conv_dim] and an SSM state [rows, H, P, N]
(float32 by default); attention layers keep keys and values [rows, max_len, Hkv, D]. Nothing is
allocated per step: rows are bound to a batch with ``bind`` and updated in place.
"""

from __future__ import annotations

import torch

from bamba.config import BambaConfig
from bamba.cache_protocol import KVLayout


class ContiguousCache:
    """Implements ``bamba.model.InferenceCache`` over fixed rows."""

    def __init__(self, config: BambaConfig, rows: int, max_len: int, dtype: torch.dtype,
                 state_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        if rows <= 0 or max_len <= 0:
            raise ValueError(f"cache needs rows > 0 and max_len > 0, got {rows}, {max_len}")
        self.max_len = max_len
        k = config.mamba_d_conv - 1
        h, p, n = config.mamba_n_heads, config.mamba_d_head, config.mamba_d_state
        self.conv = {i: torch.zeros(rows, k, config.conv_dim, dtype=dtype, device=device)
                     for i in config.mamba_layer_indices}
        self.ssm = {i: torch.zeros(rows, h, p, n, dtype=state_dtype, device=device)
                    for i in config.mamba_layer_indices}
        kv_shape = (rows, max_len, config.num_key_value_heads, config.head_dim)
        self.keys = {i: torch.zeros(kv_shape, dtype=dtype, device=device)
                     for i in config.attn_layer_indices}
        self.values = {i: torch.zeros(kv_shape, dtype=dtype, device=device)
                       for i in config.attn_layer_indices}
        self.rows = torch.arange(rows, device=device)
        self.rows_share_slots = False
        self._saved: tuple[dict, dict] | None = None  # checkpoint_states' copy of one row
        self._all_rows = rows
        self._whole = True  # rows are every row in order: the pools serve as they are

    def bind(self, rows: torch.Tensor | list[int]) -> "ContiguousCache":
        """Select which rows the next forward passes read and write (in batch order). A row
        may come again in adjacent batch rows: they are one sequence's successive tokens, a
        token a batch row, which only the native one-call step takes (it advances the state
        token by token; the model refuses such a batch otherwise)."""
        self.rows = torch.as_tensor(rows, dtype=torch.long, device=self.rows.device)
        self.rows_share_slots = len(set(self.rows.tolist())) < len(self.rows)
        self._whole = len(self.rows) == self._all_rows and bool(
            (self.rows == torch.arange(self._all_rows, device=self.rows.device)).all())
        return self

    def reset(self, rows: torch.Tensor | list[int]) -> None:
        """Zero the Mamba states of rows before a new sequence uses them (KV needs no reset:
        attention reads only positions the new sequence has written)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        for i in self.conv:
            self.conv[i][rows] = 0
            self.ssm[i][rows] = 0

    def checkpoint_states(self, row: int) -> None:
        """Copy one row's Mamba states aside; ``restore_states`` puts them back (speculative
        decoding undoes rejected drafts so). One checkpoint at a time; its buffers are reused."""
        if self._saved is None:
            self._saved = ({i: c[0].clone() for i, c in self.conv.items()},
                           {i: s[0].clone() for i, s in self.ssm.items()})
        for saved, pools in zip(self._saved, (self.conv, self.ssm), strict=True):
            for i, pool in pools.items():
                saved[i].copy_(pool[row])

    def restore_states(self, row: int) -> None:
        """Put back the Mamba states ``checkpoint_states`` copied (into ``row``)."""
        if self._saved is None:
            raise RuntimeError("restore_states before any checkpoint_states")
        for saved, pools in zip(self._saved, (self.conv, self.ssm), strict=True):
            for i, pool in pools.items():
                pool[row].copy_(saved[i])

    def mamba_pools(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return self.conv[layer_idx], self.ssm[layer_idx], None if self._whole else self.rows

    def kv_pages(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, KVLayout]:
        """Keys, values and their layout for the native decode step: token row
        ``row * max_len + position``."""
        keys = self.keys[layer_idx]
        return keys, self.values[layer_idx], KVLayout(keys.stride(2), keys.stride(1))

    def token_rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token rows of the tokens at ``positions`` [B, 1] and of positions 0..T-1 of every row
        (T = 1 + the largest position), as ``kv_pages`` lays them out."""
        end = self._end(positions)
        base = self.rows * self.max_len
        return base + positions[:, -1], base[:, None] + torch.arange(end)

    def _end(self, positions: torch.Tensor) -> int:
        end = int(positions.max()) + 1
        if end > self.max_len:
            raise ValueError(f"position {end - 1} is beyond the cache length {self.max_len}")
        return end

    def update_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor,
                  positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self._end(positions)
        rows = self.rows[:, None].expand_as(positions)
        self.keys[layer_idx][rows, positions] = k
        self.values[layer_idx][rows, positions] = v
        if self._whole:
            return self.keys[layer_idx][:, :end], self.values[layer_idx][:, :end]
        return self.keys[layer_idx][self.rows, :end], self.values[layer_idx][self.rows, :end]
