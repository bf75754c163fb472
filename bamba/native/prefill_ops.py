"""The Mamba2 mixer's prefill middle in native code (``mixer_prefill.c``), for inference.

``torch.ops.bamba.mixer_prefill`` takes in_proj's output [B, L, 2·d_inner + 2·G·N + H] (bf16
or float32) and runs, in three native passes, what ``bamba.ops.mixer.mamba_prefill`` does in
torch ops: causal conv + silu and softplus'ed dt; the chunked SSD scan (float32 state; with
``bf16_matmul`` its products take bfloat16 operands with float32 accumulation); D skip, silu(z)
gate and grouped RMSNorm. It returns y in in_proj's dtype, the new conv state and the new SSM
state (float32). It has no autograd and no document ids: ``usable`` says when a call can take
it; otherwise callers use the torch path, which tests hold it equal to.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode
from torch.utils.flop_counter import register_flop_formula

from bamba import native

DTYPES = (torch.float32, torch.bfloat16)


def _lib() -> ctypes.CDLL | None:
    """The shared library when it carries these kernels for this CPU (follows
    ``bamba.native._library``, so BAMBA_NATIVE=0 and its cache_clear() apply here too)."""
    lib = native._library()
    return lib if lib is not None and _declare(lib) else None


@functools.cache
def _declare(lib: ctypes.CDLL) -> bool:
    """Set the kernels' ctypes signatures once per loaded library; False if not built here."""
    if not hasattr(lib, "bamba_prefill_supported"):
        return False
    lib.bamba_prefill_supported.restype = ctypes.c_int
    if not lib.bamba_prefill_supported():
        return False
    i32, i64, ptr, f32 = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    lib.bamba_prefill_conv.argtypes = [ptr, i32, i64, i64, i64, i64, i64, i64, i64, ptr, ptr,
                                       ptr, ptr, f32, f32, ptr, ptr, ptr, i32]
    lib.bamba_prefill_scan.argtypes = [ptr, i64, i64, i64, i64, i64, i64, i64, ptr, ptr, ptr,
                                       i32, ptr, i64, i32, i32]
    lib.bamba_prefill_gate_norm.argtypes = [ptr, ptr, i64, ptr, i32, i64, i64, i64, i64, i64,
                                            ptr, ptr, f32, ptr, i32, i32]
    for name in ("bamba_prefill_conv", "bamba_prefill_scan", "bamba_prefill_gate_norm"):
        getattr(lib, name).restype = ctypes.c_int
    return True


@torch.compiler.assume_constant_result
def available() -> bool:
    """True when the kernels are built for this CPU (AVX-512 BF16) and not disabled."""
    return _lib() is not None


def usable(zxbcdt: torch.Tensor, seq_idx: torch.Tensor | None,
           params: tuple[torch.Tensor | None, ...], sizes: tuple[int, int, int, int]) -> bool:
    """Whether ``mixer_prefill`` serves this call: CPU, float32 or bf16, no document ids, no
    autograd, ``sizes`` = (heads, head_dim, groups, d_state) with head_dim, d_state and
    d_inner/groups multiples of 16, and the kernels built. Eager code under a dispatch mode
    (FlopCounterMode...) keeps the torch ops, which such modes can see into."""
    h, p, g, n = sizes
    grad = torch.is_grad_enabled() and (zxbcdt.requires_grad or
                                        any(t is not None and t.requires_grad for t in params))
    return seq_idx is None and not grad and zxbcdt.device.type == "cpu" \
        and zxbcdt.dtype in DTYPES and zxbcdt.shape[1] > 0 and p % 16 == 0 and n % 16 == 0 \
        and (h * p // g) % 16 == 0 and available() \
        and (torch.compiler.is_compiling() or not is_in_torch_dispatch_mode())


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
    lib = _lib()
    if lib is None:
        raise RuntimeError("the native prefill kernels are unavailable (see available())")
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
