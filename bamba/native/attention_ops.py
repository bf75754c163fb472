"""Decode attention (one query token per row) over keys and values in place
(``attention_step.c``), as the torch operator ``torch.ops.bamba.decode_attention``.

Same contract as ``bamba.ops.attention.matmul_attention`` for one query token: q [B, 1, H, D],
k and v [B, T, Hkv, D] with any row/time/head strides (head_dim contiguous), a boolean mask
[B, 1, 1, T], an optional score scale; float32 softmax; the output [B, 1, H, D] in q's dtype. Eager callers go through
``decode_attention`` (the library directly); torch.compile and dispatch modes see the op.
"""

from __future__ import annotations

import ctypes

import torch

from bamba.native import library
from bamba.native.dispatch import through_dispatcher


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    b, l, h, d = q.shape
    t, hkv = k.shape[1], k.shape[2]
    if l != 1 or k.shape != (b, t, hkv, d) or v.shape != k.shape or h % hkv or \
            mask.shape != (b, 1, 1, t) or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"decode attention: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}, mask {tuple(mask.shape)} do not fit")
    q = q.contiguous()
    keep = mask.reshape(b, t).to(torch.uint8).contiguous()
    out = torch.empty_like(q)
    strides = [(ctypes.c_int64 * 3)(*(x.stride(i) for i in range(3))) for x in (k, v)]
    status = library.load().bamba_decode_attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), keep.data_ptr(), out.data_ptr(), b, h, hkv, d,
        t, strides[0], strides[1], int(q.dtype == torch.bfloat16), d ** -0.5 if scale is None else scale,
        torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"decode_attention failed (status {status})")
    return out


_op = torch.library.custom_op("bamba::decode_attention", mutates_args=(),
                              device_types="cpu")(_decode_attention)


@_op.register_fake
def _(q, k, v, mask, scale=None):
    return torch.empty_like(q)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Attention of one query token per row, scores times ``scale`` (default D ** -0.5); see
    the module docstring."""
    if through_dispatcher():
        return _op(q, k, v, mask, scale)
    return _decode_attention(q, k, v, mask, scale)
