"""Causal grouped-query attention over a key range that may come from a cache.

Two formulations of the same softmax attention:

* long queries (prefill) use ``F.scaled_dot_product_attention`` (the CPU flash kernel);
* training on rows of at most ``TRAIN_MATMUL_MAX_LEN`` tokens uses the matmul formulation below
  (its compiled backward is faster there);
* decode (L <= ``MATMUL_MAX_QUERY``) uses ``decode`` when the caller passes one (the native
  kernel reads keys and values in place: torch's bf16 matmul builds a new oneDNN primitive for
  each new key length), else two batched matmuls, the query heads of a KV group stacked as
  rows, so every KV head is read once for its whole group; on a CPU the flash kernel is slower
  than that for a single bf16 query and as fast from a few queries on. The scores
  are computed in the input dtype (as transformers' eager path does), then scaled, masked and
  soft-maxed in float32; the probabilities are cast back for the product with the values.

Keys and values laid out head-major in memory ([Hkv, B, T, D] behind a [B, T, Hkv, D] view,
as the engine's paged gather returns them) are read without a copy.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

MATMUL_MAX_QUERY = 1  # longest query run through the matmul formulation (see the docstring)
# Training (autograd) on short packed rows: the matmul formulation's forward and backward, compiled,
# beat the flash kernel with a document mask up to this length (benchmarks/bench_train_parts.py,
# benchmarks/README.md#training-parts); its scores grow with the square of the length, so longer
# rows keep the flash kernel.
TRAIN_MATMUL_MAX_LEN = 256


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


DecodeAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float | None],
                           torch.Tensor]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              decode: DecodeAttention | None = None, scale: float | None = None) -> torch.Tensor:
    """Softmax attention. q: [B, L, H, D]; k, v: [B, T, Hkv, D]; mask [B, 1, L, T] or None
    for plain causal with L == T; scores times ``scale`` (default D ** -0.5). Returns
    [B, L, H, D] in q's dtype. ``decode`` replaces ``matmul_attention`` for masked short
    queries (same contract)."""
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of KV heads "
                         f"({k.shape[2]})")
    if mask is not None and q.shape[1] <= MATMUL_MAX_QUERY:
        return (decode or matmul_attention)(q, k, v, mask, scale)
    if mask is not None and k.shape[1] <= TRAIN_MATMUL_MAX_LEN and torch.is_grad_enabled() \
            and q.requires_grad:
        return matmul_attention(q, k, v, mask, scale)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, len, D]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                         enable_gqa=k.shape[1] != q.shape[1], scale=scale)
    return out.transpose(1, 2)


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``attention`` as scores = q kᵀ, float32 masked softmax, probs v; mask [B, 1, L, T]."""
    b, l, h, d = q.shape
    t, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    # [Hkv, B, G*L, D]: the G query heads sharing a KV head are rows of one matrix product.
    qh = q.reshape(b, l, hkv, g, d).permute(2, 0, 3, 1, 4).reshape(hkv, b, g * l, d)
    kh, vh = k.permute(2, 0, 1, 3), v.permute(2, 0, 1, 3)  # [Hkv, B, T, D] (views)
    scores = torch.matmul(qh, kh.transpose(-1, -2)).float().mul_(d ** -0.5 if scale is None else scale)  # [Hkv, B, G*L, T]
    scores = scores.view(hkv, b, g, l, t)
    # Decode of equal-length rows sees every key: skip the mask (a data-dependent branch, so a
    # compiled graph always applies it).
    if torch.compiler.is_compiling() or not bool(mask.all()):
        scores.masked_fill_(~mask[:, 0][None, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype).view(hkv, b, g * l, t)
    out = torch.matmul(probs, vh)  # [Hkv, B, G*L, D]
    return out.view(hkv, b, g, l, d).permute(1, 3, 0, 2, 4).reshape(b, l, h, d).to(q.dtype)
