"""Prefill's elementwise glue in one native pass each (``elementwise.c``): ``silu_mul`` (the
SwiGLU product) and ``rms_norm``, for bf16 or float32 CPU inference. Same values as the torch
expressions they replace (``F.silu(g) * u``; ``bamba.ops.norm.rms_norm``), rounded at the same
points. Eager calls go to the library; torch.compile and dispatch modes see registered ops.
"""

from __future__ import annotations


import torch

from bamba.native import library
from bamba.native.dispatch import through_dispatcher


def _silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    if g.shape != u.shape or g.dtype != u.dtype:
        raise ValueError(f"silu_mul: gate {tuple(g.shape)} {g.dtype} and up {tuple(u.shape)} "
                         f"{u.dtype} differ")
    g, u = g.contiguous(), u.contiguous()
    out = torch.empty_like(g)
    library.load().bamba_silu_mul(g.data_ptr(), u.data_ptr(), out.data_ptr(), g.numel(),
                              int(g.dtype == torch.bfloat16), torch.get_num_threads())
    return out


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    d = x.shape[-1]
    if weight.shape != (d,) or weight.dtype != x.dtype:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} {weight.dtype} does not fit "
                         f"x [..., {d}] {x.dtype}")
    x = x.contiguous()
    out = torch.empty_like(x)
    status = library.load().bamba_rms_norm(x.data_ptr(), weight.contiguous().data_ptr(),
                                       out.data_ptr(), x.numel() // d, d, eps,
                                       int(x.dtype == torch.bfloat16), torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"rms_norm failed (status {status})")
    return out


_silu_mul_op = torch.library.custom_op("bamba::silu_mul", mutates_args=(),
                                       device_types="cpu")(_silu_mul)
_rms_norm_op = torch.library.custom_op("bamba::rms_norm", mutates_args=(),
                                       device_types="cpu")(_rms_norm)


@_silu_mul_op.register_fake
def _(g, u):
    return torch.empty_like(g)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u in one pass (see ``usable``)."""
    return _silu_mul_op(g, u) if through_dispatcher() else _silu_mul(g, u)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / rms(x) over the last dim in one pass (see ``usable``)."""
    return _rms_norm_op(x, weight, eps) if through_dispatcher() else _rms_norm(x, weight, eps)
