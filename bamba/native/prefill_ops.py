"""The Mamba2 mixer's prefill middle in native code (``mixer_prefill.c``), for inference.

``torch.ops.bamba.mixer_prefill`` takes in_proj's output [B, L, 2·d_inner + 2·G·N + H] (bf16
or float32) and runs, in three native passes, what ``bamba.ops.mixer.mamba_prefill`` does in
torch ops: causal conv + silu and softplus'ed dt; the chunked SSD scan (float32 state; with
``bf16_matmul`` its products take bfloat16 operands with float32 accumulation); D skip, silu(z)
gate and grouped RMSNorm. It returns y in in_proj's dtype, the new conv state and the new SSM
state (float32). It has no autograd and no document ids: ``bamba.native.dispatch.prefill_fits``
says when a call can take it; otherwise callers use the torch path, which tests hold it equal
to.
"""

from __future__ import annotations

import ctypes

import torch
from torch.utils.flop_counter import register_flop_formula

from bamba.native import dispatch, library

def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"mixer_prefill: the native {what} kernel failed (shapes it does "
                           "not support, or out of memory)")


@torch.library.custom_op("bamba::mixer_prefill", mutates_args=(), device_types="cpu")
def mixer_prefill(zxbcdt: torch.Tensor, conv_state: torch.Tensor | None,
                  ssm_state: torch.Tensor | None, conv_weight: torch.Tensor,
                  conv_bias: torch.Tensor | None, dt_bias: torch.Tensor, A_log: torch.Tensor,
                  D: torch.Tensor, norm_weight: torch.Tensor, dims: list[int],
                  consts: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dims = [heads, head_dim, groups, d_state, chunk, bf16_matmul]; consts = [dt_min, dt_max,
    eps]. conv_weight [conv_dim, K]; states as in ``bamba.ops.mixer`` (None: start from zero).
    Returns y [B, L, d_inner] (zxbcdt's dtype), conv state [B, K-1, conv_dim] and SSM state
    [B, H, P, N] (float32)."""
    if not dispatch.prefill_available():
        raise RuntimeError("the native prefill kernels are unavailable here")
    lib = library.load()
    h, p, g, n, chunk, bf16_matmul = dims
    zx = zxbcdt.detach().contiguous()
    xbc, dt, conv_out = _conv_pass(lib, zx, conv_state, conv_weight, conv_bias, dt_bias, h,
                                   h * p + 2 * g * n, consts)
    state = zx.new_empty(zx.shape[0], h, p, n, dtype=torch.float32)
    if ssm_state is not None:
        state.copy_(ssm_state)
    A = -torch.exp(A_log.detach().float())
    y = zx.new_empty(*zx.shape[:2], h * p, dtype=torch.float32)
    _check(lib.bamba_prefill_scan(
        xbc.data_ptr(), zx.shape[0], zx.shape[1], xbc.shape[-1], h, p, g, n, dt.data_ptr(),
        A.data_ptr(), state.data_ptr(), int(ssm_state is not None), y.data_ptr(), chunk,
        bf16_matmul, torch.get_num_threads()), "scan")
    return _norm_pass(lib, zx, xbc, y, D, norm_weight, p, g, consts[2]), conv_out, state


def _conv_pass(lib: ctypes.CDLL, zx: torch.Tensor, conv_state: torch.Tensor | None,
               conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, dt_bias: torch.Tensor,
               h: int, conv_dim: int, consts: list[float]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, B, C after conv + silu [B, L, conv_dim], dt [B, L, H], new conv state (float32)."""
    b, l, width = zx.shape
    k = conv_weight.shape[-1]
    xbc = zx.new_empty(b, l, conv_dim, dtype=torch.float32)
    dt = zx.new_empty(b, l, h, dtype=torch.float32)
    conv_out = zx.new_empty(b, k - 1, conv_dim, dtype=torch.float32)
    # float32 copies held in locals while the kernel reads them
    wt, dtb = _f32(conv_weight.reshape(conv_dim, k).t()), _f32(dt_bias)
    bias = None if conv_bias is None else _f32(conv_bias)
    cs = None if conv_state is None else _f32(conv_state)
    _check(lib.bamba_prefill_conv(
        zx.data_ptr(), int(zx.dtype == torch.bfloat16), b, l, width, width - conv_dim - h,
        conv_dim, h, k, wt.data_ptr(), None if bias is None else bias.data_ptr(),
        None if cs is None else cs.data_ptr(), dtb.data_ptr(), consts[0], consts[1],
        xbc.data_ptr(), dt.data_ptr(), conv_out.data_ptr(), torch.get_num_threads()), "conv")
    return xbc, dt, conv_out


def _norm_pass(lib: ctypes.CDLL, zx: torch.Tensor, xbc: torch.Tensor, y: torch.Tensor,
               D: torch.Tensor, norm_weight: torch.Tensor, p: int, g: int,
               eps: float) -> torch.Tensor:
    """(y + D x) silu(z), RMS-normalised per group, times the weight, in zx's dtype."""
    skip, nw = _f32(D), _f32(norm_weight)
    out = torch.empty_like(y, dtype=zx.dtype)
    bf16 = int(zx.dtype == torch.bfloat16)
    _check(lib.bamba_prefill_gate_norm(
        y.data_ptr(), xbc.data_ptr(), xbc.shape[-1], zx.data_ptr(), bf16, zx.shape[-1],
        y.shape[0] * y.shape[1], y.shape[-1], p, g, skip.data_ptr(), nw.data_ptr(), eps,
        out.data_ptr(), bf16, torch.get_num_threads()), "gate-norm")
    return out


@mixer_prefill.register_fake
def _(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight,
      dims, consts):
    h, p, g, n = dims[:4]
    b, l, _ = zxbcdt.shape
    conv_dim = h * p + 2 * g * n
    f32 = torch.float32
    return (zxbcdt.new_empty(b, l, h * p), zxbcdt.new_empty(b, conv_weight.shape[-1] - 1,
                                                            conv_dim, dtype=f32),
            zxbcdt.new_empty(b, h, p, n, dtype=f32))


@register_flop_formula(torch.ops.bamba.mixer_prefill)
def _mixer_prefill_flops(zx_shape, *args, dims=None, **kwargs) -> int:
    """For FlopCounterMode (in compiled graphs): the scan's matmuls as the torch path counts
    them (C·Bᵀ, diagonal blocks, chunk states, state read-out; the last chunk whole)."""
    h, p, g, n, chunk = (dims if dims is not None else args[-2])[:5]
    b, l = zx_shape[:2]
    padded = -(-l // chunk) * chunk
    return 2 * b * padded * (chunk * g * n + chunk * h * p + 2 * h * p * n)
