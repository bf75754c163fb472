"""The one-pass Mamba2 SSM decode step over a state pool (``ssd_step.c``), as the torch
operator ``torch.ops.bamba.ssd_step_pool`` (it mutates the pool), so eager code and
torch.compile graphs call it alike. Same contract as ``bamba.ops.ssd.ssd_step``."""

from __future__ import annotations

import torch

from bamba.native import dispatch, library


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


@torch.library.custom_op("bamba::ssd_step_pool", mutates_args=("pool",), device_types="cpu")
def ssd_step_pool(pool: torch.Tensor, rows: torch.Tensor, x: torch.Tensor, dt: torch.Tensor,
                  A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Advance ``pool[rows]`` ([S, H, P, N], float32 or bfloat16, contiguous) by one token in
    place; x [B, H, P], dt [B, H] (softplus'ed), A [H], B and C [B, G, N]. Returns y [B, H, P]
    float32 (before the D skip). Same contract as ``bamba.ops.ssd.ssd_step``."""
    if not dispatch.ssd_step_available():
        raise RuntimeError("the native SSD kernel is unavailable (see ssd_step_available())")
    s, h, p, n = pool.shape
    b, g = x.shape[0], B.shape[1]
    if pool.dtype not in (torch.float32, torch.bfloat16) or not pool.is_contiguous():
        raise ValueError(f"state pool must be contiguous float32 or bfloat16, got {pool.dtype}")
    if x.shape != (b, h, p) or dt.shape != (b, h) or B.shape != (b, g, n) or \
            C.shape != (b, g, n) or A.shape != (h,) or rows.shape != (b,) or h % g:
        raise ValueError("ssd_step_pool: inconsistent shapes")
    rows = rows.to(torch.int64).contiguous()
    if b and (int(rows.min()) < 0 or int(rows.max()) >= s):
        raise ValueError(f"ssd_step_pool: rows must lie in [0, {s})")
    x, dt, A, B, C = (_f32(t) for t in (x, dt, A, B, C))
    y = torch.empty(b, h, p, dtype=torch.float32)
    library.load().bamba_ssd_step_pool(
        pool.data_ptr(), int(pool.dtype == torch.bfloat16), rows.data_ptr(), b, h, p, n, g,
        x.data_ptr(), dt.data_ptr(), A.data_ptr(), B.data_ptr(), C.data_ptr(), y.data_ptr(),
        torch.get_num_threads())
    return y


@ssd_step_pool.register_fake
def _(pool, rows, x, dt, A, B, C):
    return x.new_empty(x.shape, dtype=torch.float32)
