"""The Mamba2 mixer's causal conv + silu with its backward in native code (``conv_train.c``),
for training and other cache-free forward passes.

``torch.ops.bamba.conv_silu(x, weight, bias, seq_idx)`` = ``silu(causal_conv1d(x, weight, bias,
None, seq_idx)[0])`` for float32 x [B, L, D] (rows may be strided: a slice of in_proj's output),
weight [D, K]; its gradient is ``torch.ops.bamba.conv_silu_backward`` (one pass: the
pre-activation is recomputed, not stored). It is faster than inductor's code of the same torch
ops, whose weight gradient is reduced over batch and time from the taps' shifted slices
(benchmarks/README.md#training-parts). ``bamba.native.dispatch.conv_train_fits`` says when a call
can take the kernels; otherwise callers use the torch ops, which tests hold these equal to.
"""

from __future__ import annotations


import torch

from bamba.native import dispatch, library

DTYPE = torch.float32


def _operands(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              seq_idx: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The float32 / int64 contiguous copies the kernels read (x keeps its row strides)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    wt = weight.detach().to(DTYPE).t().contiguous()  # [K, D]
    b = None if bias is None else bias.detach().to(DTYPE).contiguous()
    seq = None if seq_idx is None else seq_idx.to(torch.int64).contiguous()
    return x.detach(), wt, b, seq


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(rc: int, what: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    if rc != 0:
        raise RuntimeError(f"conv_silu {what}: unsupported here (x {tuple(x.shape)} {x.dtype}, "
                           f"weight {tuple(weight.shape)}; see dispatch.conv_train_fits)")


@torch.library.custom_op("bamba::conv_silu", mutates_args=(), device_types="cpu")
def conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              seq_idx: torch.Tensor | None) -> torch.Tensor:
    """silu(causal depthwise conv of x) [B, L, D] float32; taps stay inside each document of
    ``seq_idx`` [B, L] and start from a zero state."""
    if not dispatch.conv_train_available():
        raise RuntimeError("the native training kernels are unavailable here")
    lib = library.load()
    xs, wt, b, seq = _operands(x, weight, bias, seq_idx)
    n, l, d = xs.shape
    y = torch.empty(n, l, d, dtype=DTYPE)
    _check(lib.bamba_conv_silu_fwd(xs.data_ptr(), xs.stride(0), xs.stride(1), n, l, d,
                                   wt.shape[0], wt.data_ptr(), _ptr(b), _ptr(seq), y.data_ptr(),
                                   torch.get_num_threads()), "forward", x, weight)
    return y


@conv_silu.register_fake
def _(x, weight, bias, seq_idx):
    return x.new_empty(x.shape, dtype=DTYPE)


@torch.library.custom_op("bamba::conv_silu_backward", mutates_args=(), device_types="cpu")
def conv_silu_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None, seq_idx: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``conv_silu`` for its output gradient dy: (dx [B, L, D], dweight [D, K],
    dbias [D]) in float32 (dbias is computed even without a bias; callers drop it)."""
    if not dispatch.conv_train_available():
        raise RuntimeError("the native training kernels are unavailable here")
    lib = library.load()
    xs, wt, b, seq = _operands(x, weight, bias, seq_idx)
    n, l, d = xs.shape
    dy = dy.to(DTYPE).contiguous()
    dx, dwt, db = torch.empty(n, l, d), torch.empty(wt.shape), torch.empty(d)
    _check(lib.bamba_conv_silu_bwd(xs.data_ptr(), xs.stride(0), xs.stride(1), n, l, d,
                                   wt.shape[0], wt.data_ptr(), _ptr(b), _ptr(seq), dy.data_ptr(),
                                   dx.data_ptr(), dwt.data_ptr(), db.data_ptr(),
                                   torch.get_num_threads()), "backward", x, weight)
    return dx, dwt.t().contiguous(), db


@conv_silu_backward.register_fake
def _(dy, x, weight, bias, seq_idx):
    d, k = weight.shape
    return x.new_empty(x.shape, dtype=DTYPE), x.new_empty(d, k, dtype=DTYPE), \
        x.new_empty(d, dtype=DTYPE)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, seq_idx = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, bias, seq_idx)


def _backward(ctx, dy):
    x, weight, bias, seq_idx = ctx.saved_tensors
    dx, dw, db = torch.ops.bamba.conv_silu_backward(dy, x, weight, bias, seq_idx)
    return dx, dw.to(weight.dtype), db.to(bias.dtype) if ctx.has_bias else None, None


conv_silu.register_autograd(_backward, setup_context=_setup_context)

