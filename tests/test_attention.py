"""Attention's two formulations (matmul for short queries, SDPA for long) against a float64 loop."""

import math

import pytest
import torch

from bamba.native import seam
from bamba.native import attention_ops, dispatch
from bamba.ops import attention as attn


def reference(q, k, v, mask):
    """Per batch row and head, explicit float64 softmax over the visible keys."""
    b, l, h, d = q.shape
    g = h // k.shape[2]
    out = torch.zeros(b, l, h, d, dtype=torch.float64)
    for i in range(b):
        for j in range(h):
            qi, ki, vi = q[i, :, j].double(), k[i, :, j // g].double(), v[i, :, j // g].double()
            scores = qi @ ki.T / math.sqrt(d)  # [L, T]
            scores = scores.masked_fill(~mask[i, 0], float("-inf"))
            out[i, :, j] = torch.softmax(scores, -1) @ vi
    return out


def ragged_case(batch, q_len, dtype, heads=8, kv_heads=2, dim=16, seed=0):
    """Rows of different lengths: row i's queries end at position lengths[i] - 1."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([30 - 7 * i for i in range(batch)])
    t = int(lengths.max())
    positions = lengths[:, None] - q_len + torch.arange(q_len)[None]
    q, k, v = (torch.randn(batch, n, hh, dim, generator=gen).to(dtype)
               for n, hh in ((q_len, heads), (t, kv_heads), (t, kv_heads)))
    return q, k, v, attn.causal_mask(positions, t)


@pytest.mark.parametrize("q_len", [1, 3, 8, 12])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_attention_matches_float64_reference(q_len, dtype, tol):
    q, k, v, mask = ragged_case(3, q_len, dtype)
    out = attn.attention(q, k, v, mask)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), reference(q, k, v, mask), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_matmul_and_sdpa_paths_agree(dtype, tol):
    q, k, v, mask = ragged_case(3, 5, dtype, seed=1)
    fast = attn.matmul_attention(q, k, v, mask)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask,
                                                            enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(fast.double(), sdpa.double(), atol=tol, rtol=tol)


def test_matmul_path_reads_head_major_views():
    """A [B, T, Hkv, D] view of a head-major buffer (the engine's gather) gives the same result."""
    q, k, v, mask = ragged_case(2, 1, torch.float32, seed=2)
    kh, vh = (x.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3) for x in (k, v))
    assert not kh.is_contiguous()
    torch.testing.assert_close(attn.attention(q, kh, vh, mask), attn.attention(q, k, v, mask))


def test_dispatch_uses_matmul_only_for_short_masked_queries(monkeypatch):
    calls = []
    real = attn.matmul_attention
    monkeypatch.setattr(attn, "matmul_attention", lambda *a: calls.append(1) or real(*a))
    q, k, v, mask = ragged_case(2, 1, torch.float32)
    attn.attention(q, k, v, mask)
    assert calls == [1]
    q, k, v, mask = ragged_case(2, attn.MATMUL_MAX_QUERY + 1, torch.float32)
    attn.attention(q, k, v, mask)
    x = torch.randn(1, 4, 8, 16)
    attn.attention(x, x[:, :, :2], x[:, :, :2], None)  # causal, no mask: SDPA
    assert calls == [1]


def packed_training_case(length: int, seed: int = 0):
    """Packed rows (two documents each) with leaves that need gradients."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, length, h, 16, generator=gen) for h in (8, 2, 2))
    seq_idx = (torch.arange(length) >= length // 3).long().expand(2, length)
    mask = attn.causal_mask(torch.arange(length).expand(2, length), length, seq_idx)
    return q, k, v, mask


def test_training_on_short_rows_takes_the_matmul_path_with_the_same_gradients(monkeypatch):
    calls = []
    real = attn.matmul_attention
    monkeypatch.setattr(attn, "matmul_attention", lambda *a: calls.append(1) or real(*a))
    for length in (attn.TRAIN_MATMUL_MAX_LEN, attn.TRAIN_MATMUL_MAX_LEN + 1):
        q, k, v, mask = packed_training_case(length)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attn.attention(*leaves, mask)
        assert calls == [1], length  # the short row only
        torch.testing.assert_close(out.double(), reference(q, k, v, mask), atol=1e-5, rtol=1e-5)
        out.square().sum().backward()
        flash = [t.clone().requires_grad_() for t in (q, k, v)]
        qf, kf, vf = (t.transpose(1, 2) for t in flash)
        torch.nn.functional.scaled_dot_product_attention(
            qf, kf, vf, attn_mask=mask, enable_gqa=True).transpose(1, 2).square().sum().backward()
        for a, b in zip(leaves, flash, strict=True):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # inference keeps the flash kernel
        attn.attention(*packed_training_case(8)[:3], packed_training_case(8)[3])
    assert calls == [1]


def test_head_count_mismatch_is_a_value_error():
    q = torch.randn(1, 1, 6, 8)
    k = torch.randn(1, 4, 4, 8)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        attn.attention(q, k, k, None)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_decode_with_every_key_visible_skips_nothing(dtype, tol):
    q, k, v, mask = ragged_case(1, 1, dtype, seed=3)  # one row: its query sees all keys
    assert mask.all()
    torch.testing.assert_close(attn.attention(q, k, v, mask).double(), reference(q, k, v, mask),
                               atol=tol, rtol=tol)


needs_native = pytest.mark.skipif(not dispatch.decode_attention_fits(*(torch.zeros(1, 1, 1, 8),) * 3),
                                  reason="the native decode attention needs a C compiler")


@needs_native
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("head_major", [False, True])
def test_native_decode_attention_matches_the_reference(dtype, tol, head_major):
    """Ragged rows, grouped heads, keys read in place from either layout (the contiguous
    cache's [B, T, Hkv, D] or the engine's head-major pages)."""
    q, k, v, mask = ragged_case(3, 1, dtype, seed=4)
    if head_major:
        k, v = (x.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3) for x in (k, v))
    out = attention_ops.decode_attention(q, k, v, mask)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), reference(q, k, v, mask), atol=tol, rtol=tol)
    assert dispatch.decode_attention_fits(q, k, v)
    # what attention() runs in an accelerated model
    torch.testing.assert_close(attn.attention(q, k, v, mask, seam.decode_attention), out)


@needs_native
def test_native_decode_attention_rejects_what_does_not_fit():
    q, k, v, mask = ragged_case(2, 1, torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        attention_ops.decode_attention(q, k[:, :-1], v, mask)
    assert not dispatch.decode_attention_fits(q, k[..., ::2], v[..., ::2])  # head_dim strided
    assert not dispatch.decode_attention_fits(q.double(), k.double(), v.double())
    assert not dispatch.decode_attention_fits(q.requires_grad_(), k, v)
