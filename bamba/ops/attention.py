"""Causal grouped-query attention over a key range that may come from a cache."""

import torch
import torch.nn.functional as F


def causal_mask(q_positions: torch.Tensor, key_len: int,
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean [B, 1, L, T] mask: query at position p sees keys 0..p (and only its own document).

    q_positions: [B, L] absolute positions of the queries; keys are positions 0..key_len-1.
    seq_idx: [B, L] document ids of a packed row (no cache): keys must share the query's id.
    """
    keys = torch.arange(key_len, device=q_positions.device)
    mask = keys[None, None, :] <= q_positions[:, :, None]  # [B, L, T]
    if seq_idx is not None:
        mask = mask & (seq_idx[:, :, None] == seq_idx[:, None, :key_len])
    return mask[:, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention. q: [B, L, H, D]; k, v: [B, T, Hkv, D]; mask [B, 1, L, T] or None
    for plain causal with L == T. Returns [B, L, H, D]."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, len, D]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2)
