"""Every fast op against its naive reference, with real tolerances."""

import pytest
import torch

from bamba.ops.conv import causal_conv1d, causal_conv1d_step
from bamba.ops.ssd import ssd_chunked, ssd_naive, ssd_step


def _ssd_inputs(b=2, l=37, h=4, p=8, g=2, n=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen)
    dt = torch.rand(b, l, h, generator=gen) * 0.5
    A = -torch.rand(h, generator=gen) * 4 - 0.1
    B = torch.randn(b, l, g, n, generator=gen)
    C = torch.randn(b, l, g, n, generator=gen)
    s0 = torch.randn(b, h, p, n, generator=gen)
    return x, dt, A, B, C, s0


@pytest.mark.parametrize("length,chunk", [(1, 8), (7, 8), (8, 8), (37, 8), (64, 16), (5, 256)])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_chunked_scan_matches_sequential_loop(length, chunk, groups):
    x, dt, A, B, C, s0 = _ssd_inputs(l=length, g=groups)
    for init in (None, s0):
        y_ref, s_ref = ssd_naive(x, dt, A, B, C, init)
        y, s = ssd_chunked(x, dt, A, B, C, chunk, init)
        torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(s, s_ref, atol=2e-5, rtol=1e-4)


def test_chunked_scan_resets_state_at_document_boundaries():
    x, dt, A, B, C, s0 = _ssd_inputs(l=37)
    seq_idx = torch.tensor([[0] * 10 + [1] * 5 + [2] * 22, [0] * 30 + [1] * 7])
    y_ref, s_ref = ssd_naive(x, dt, A, B, C, s0, seq_idx)
    y, s = ssd_chunked(x, dt, A, B, C, 8, s0, seq_idx)
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(s, s_ref, atol=2e-5, rtol=1e-4)
    # and a document inside a packed row equals that document run alone
    y_alone, _ = ssd_naive(x[:1, 10:15], dt[:1, 10:15], A, B[:1, 10:15], C[:1, 10:15])
    torch.testing.assert_close(y[:1, 10:15], y_alone, atol=2e-5, rtol=1e-4)


def test_chunked_scan_carries_state_across_calls():
    x, dt, A, B, C, s0 = _ssd_inputs(l=40)
    y_full, s_full = ssd_chunked(x, dt, A, B, C, 16, s0)
    y1, s1 = ssd_chunked(x[:, :13], dt[:, :13], A, B[:, :13], C[:, :13], 16, s0)
    y2, s2 = ssd_chunked(x[:, 13:], dt[:, 13:], A, B[:, 13:], C[:, 13:], 16, s1)
    torch.testing.assert_close(torch.cat((y1, y2), 1), y_full, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(s2, s_full, atol=2e-5, rtol=1e-4)


def test_step_recurrence_matches_sequential_loop():
    x, dt, A, B, C, s0 = _ssd_inputs(l=12)
    y_ref, s_ref = ssd_naive(x, dt, A, B, C, s0)
    state, ys = s0, []
    for t in range(12):
        y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t])
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, s_ref, atol=1e-5, rtol=1e-5)


def test_scan_keeps_float32_state_for_bf16_inputs():
    x, dt, A, B, C, s0 = _ssd_inputs(l=20)
    y, s = ssd_chunked(x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), 8)
    assert s.dtype == torch.float32 and y.dtype == torch.float32
    y_ref, _ = ssd_naive(x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16())
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)


def _conv_reference(x, weight, bias, state):
    """Explicit loop over time and taps."""
    k = weight.shape[1]
    window = torch.cat((state, x), 1)
    out = torch.empty_like(x)
    for t in range(x.shape[1]):
        out[:, t] = bias + sum(weight[:, j] * window[:, t + j] for j in range(k))
    return out


def test_causal_conv_prefill_step_and_state():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 6, generator=gen)
    w, bias = torch.randn(6, 4, generator=gen), torch.randn(6, generator=gen)
    state = torch.randn(2, 3, 6, generator=gen)
    y, new_state = causal_conv1d(x, w, bias, state)
    torch.testing.assert_close(y, _conv_reference(x, w, bias, state))
    torch.testing.assert_close(new_state, x[:, -3:])
    s, ys = state, []
    for t in range(9):
        yt, s = causal_conv1d_step(x[:, t], w, bias, s)
        ys.append(yt)
    torch.testing.assert_close(torch.stack(ys, 1), y)
    torch.testing.assert_close(s, new_state)


def test_causal_conv_does_not_cross_documents():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 10, 3, generator=gen)
    w, bias = torch.randn(3, 4, generator=gen), torch.randn(3, generator=gen)
    seq_idx = torch.tensor([[0] * 6 + [1] * 4])
    y, _ = causal_conv1d(x, w, bias, None, seq_idx)
    y_doc, _ = causal_conv1d(x[:, 6:], w, bias)
    torch.testing.assert_close(y[:, 6:], y_doc)


def test_step_in_place_updates_the_given_state():
    x, dt, A, B, C, s0 = _ssd_inputs(l=3)
    y_ref, s_ref = ssd_step(s0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
    state = s0.clone()
    y, s = ssd_step(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], inplace=True)
    assert s.data_ptr() == state.data_ptr()
    torch.testing.assert_close(state, s_ref)
    torch.testing.assert_close(y, y_ref)
    with pytest.raises(ValueError, match="float32"):
        ssd_step(s0.bfloat16(), x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], inplace=True)


@pytest.mark.parametrize("chunk", [8, 16, 64])
def test_chunked_scan_with_bf16_readouts_stays_close(chunk):
    x, dt, A, B, C, s0 = _ssd_inputs(l=45, g=2)
    xb, Bb, Cb = x.bfloat16(), B.bfloat16(), C.bfloat16()
    y_ref, s_ref = ssd_naive(xb, dt, A, Bb, Cb, s0)
    y, s = ssd_chunked(xb, dt, A, Bb, Cb, chunk, s0, matmul_dtype=torch.bfloat16)
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    torch.testing.assert_close(s, s_ref, atol=2e-5, rtol=1e-4)  # the state never sees bf16
    scale = y_ref.abs().max()
    assert (y - y_ref).abs().max() <= 2e-2 * scale


def test_chunked_scan_result_does_not_depend_on_chunk_length():
    x, dt, A, B, C, s0 = _ssd_inputs(l=70, g=2)
    y8, s8 = ssd_chunked(x, dt, A, B, C, 8, s0)
    y64, s64 = ssd_chunked(x, dt, A, B, C, 64, s0)
    torch.testing.assert_close(y8, y64, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(s8, s64, atol=2e-5, rtol=1e-4)
