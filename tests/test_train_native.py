"""The native training conv (bamba.native.train_ops) against the torch ops it replaces.

``torch.ops.bamba.conv_silu`` and its backward must give silu(causal_conv1d(...)) and its
autograd gradients to float32 rounding, with document resets, strided rows (a slice of
in_proj's output), with and without a bias, for Mamba2's 4 taps and other kernel sizes; and a
mixer's training forward and backward must not change when the kernels are switched off.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_prefill_native import make_mixer

from bamba.native import dispatch, library
from bamba.ops.conv import causal_conv1d
from bamba.native.seam import prefill_middle as mamba_prefill

pytestmark = pytest.mark.skipif(not dispatch.conv_train_available(),
                                reason="native training kernels not built for this CPU")

DOCS = torch.tensor([[0] * 10 + [1] * 20 + [2] * 7, [5] * 37, [0] + [1] * 36])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def conv_and_grads(native_op: bool, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                   seq_idx: torch.Tensor | None) -> list[torch.Tensor]:
    """Output and gradients (x, weight[, bias]) for a fixed random output gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w)]
    b = None if bias is None else bias.detach().clone().requires_grad_()
    if native_op:
        y = torch.ops.bamba.conv_silu(leaves[0], leaves[1], b, seq_idx)
    else:
        y = F.silu(causal_conv1d(leaves[0], leaves[1], b, None, seq_idx)[0])
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y * dy).sum().backward()
    return [y.detach(), leaves[0].grad, leaves[1].grad] + ([] if b is None else [b.grad])


@pytest.mark.parametrize("k", [4, 2, 7])
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_silu_and_its_gradients_equal_the_torch_ops(k, docs, bias):
    gen = torch.Generator().manual_seed(k)
    wide = torch.randn(3, 37, 70, generator=gen)
    x = wide[..., 5:53]  # strided rows, as the slice of in_proj's output is
    assert not x.is_contiguous()
    w, b = torch.randn(48, k, generator=gen), torch.randn(48, generator=gen) if bias else None
    seq_idx = DOCS if docs else None
    got = conv_and_grads(True, x, w, b, seq_idx)
    want = conv_and_grads(False, x, w, b, seq_idx)
    for name, g, r in zip(("y", "dx", "dweight", "dbias"), got, want):
        assert g.shape == r.shape, name
        assert rel(g, r) < 2e-6, name


def test_documents_reset_the_taps():
    """A token right after a document boundary sees none of the previous document's inputs."""
    x = torch.randn(1, 12, 16)
    w = torch.randn(16, 4)
    seq_idx = torch.tensor([[0] * 6 + [1] * 6])
    y = torch.ops.bamba.conv_silu(x, w, None, seq_idx)
    fresh = torch.ops.bamba.conv_silu(x[:, 6:], w, None, None)
    assert torch.equal(y[:, 6:], fresh)


def test_the_ops_pass_torch_library_checks():
    x = torch.randn(2, 9, 32, requires_grad=True)
    w, b = torch.randn(32, 4, requires_grad=True), torch.randn(32, requires_grad=True)
    torch.library.opcheck(torch.ops.bamba.conv_silu.default,
                          (x, w, b, torch.tensor([[0] * 4 + [1] * 5] * 2)))


def test_usable_only_where_the_kernels_apply():
    w = torch.randn(32, 4)
    assert dispatch.conv_train_fits(torch.randn(2, 5, 32), w)
    assert not dispatch.conv_train_fits(torch.randn(2, 5, 32, dtype=torch.bfloat16), w)  # float32 only
    assert not dispatch.conv_train_fits(torch.randn(2, 5, 24), torch.randn(24, 4))  # width % 16
    assert not dispatch.conv_train_fits(torch.randn(2, 5, 32), torch.randn(32, 9))  # > MAX_KERNEL taps
    assert not dispatch.conv_train_fits(torch.randn(2, 32, 5).transpose(1, 2), w)  # strided channels


def mixer_grads(zx: torch.Tensor, seq_idx: torch.Tensor) -> list[torch.Tensor]:
    shape, w = make_mixer(2, 16, 1, 16)
    params = [t.clone().requires_grad_() for t in w if t is not None]
    leaf = zx.clone().requires_grad_()
    weights = type(w)(params[0], params[1], *params[2:])
    y = mamba_prefill(leaf, None, weights, shape, seq_idx, 8, torch.float32)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return [y.detach(), leaf.grad] + [p.grad for p in params]


def test_mixer_training_step_is_unchanged_by_the_kernels(monkeypatch):
    zx = torch.randn(2, 21, 2 * 32 + 32 + 2, generator=torch.Generator().manual_seed(3))
    seq_idx = torch.tensor([[0] * 9 + [1] * 12, [0] * 21])
    calls = []
    real = dispatch.conv_train_fits
    monkeypatch.setattr(dispatch, "conv_train_fits", lambda *a: calls.append(1) or real(*a))
    with_kernels = mixer_grads(zx, seq_idx)
    assert calls and real(torch.randn(1, 1, 64), torch.randn(64, 4))
    monkeypatch.setattr(dispatch, "conv_train_fits", lambda *a: False)
    without = mixer_grads(zx, seq_idx)
    for g, r in zip(with_kernels, without, strict=True):
        assert rel(g, r) < 1e-5


def test_bamba_native_0_sends_training_to_the_torch_path(monkeypatch):
    monkeypatch.setenv("BAMBA_NATIVE", "0")
    library.load.cache_clear()
    try:
        assert not dispatch.conv_train_available()
        assert not dispatch.conv_train_fits(torch.randn(2, 5, 32), torch.randn(32, 4))
        zx = torch.randn(1, 9, 2 * 32 + 32 + 2)
        assert mixer_grads(zx, torch.zeros(1, 9, dtype=torch.long))[1] is not None
    finally:
        monkeypatch.delenv("BAMBA_NATIVE")
        library.load.cache_clear()
    assert dispatch.conv_train_available()


def test_a_compiled_training_forward_and_backward_call_the_kernels():
    """What ``compile: true`` traces keeps the native op and its backward (aot_eager: the same
    graphs without inductor's code generation)."""
    shape, w = make_mixer(2, 16, 1, 16)
    params = [t.clone().requires_grad_() for t in w]
    weights = type(w)(*params)
    zx = torch.randn(2, 21, 2 * 32 + 32 + 2, requires_grad=True)
    seq_idx = torch.tensor([[0] * 9 + [1] * 12, [0] * 21])
    step = torch.compile(lambda z: mamba_prefill(z, None, weights, shape, seq_idx, 8,
                                                 torch.float32).sum(), backend="aot_eager")
    with torch.profiler.profile() as prof:
        step(zx).backward()
    names = {e.name for e in prof.events()}
    assert {"bamba::conv_silu", "bamba::conv_silu_backward"} <= names
    assert zx.grad is not None and all(p.grad is not None for p in params)


@pytest.mark.parametrize("length", [1, 2, 3])
def test_rows_shorter_than_the_kernel(length):
    gen = torch.Generator().manual_seed(length)
    x, w, b = torch.randn(2, length, 32, generator=gen), torch.randn(32, 4, generator=gen), \
        torch.randn(32, generator=gen)
    seq_idx = torch.zeros(2, length, dtype=torch.int32)
    for g, r in zip(conv_and_grads(True, x, w, b, seq_idx), conv_and_grads(False, x, w, b, seq_idx),
                    strict=True):
        assert rel(g, r) < 2e-6
