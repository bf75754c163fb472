"""RMS normalisation, plain and gated, in float32 (variance of bf16 values is too coarse)."""

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / rms(x); statistics in float32, result cast back before the weight is applied."""
    # F.rms_norm computes x * rsqrt(mean(x²) + eps) in one fused kernel (same values).
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float,
                   group_size: int) -> torch.Tensor:
    """Mamba2's output norm: gate with silu(z) first, then normalise each group of channels.

    This is norm_before_gate=False, the order Bamba was trained with. x, gate: [..., D];
    D must be a multiple of group_size. Returns float32 (the caller casts once, before out_proj).
    """
    xf = x.float() * F.silu(gate.float())
    *prefix, d = xf.shape
    xg = F.rms_norm(xf.view(*prefix, d // group_size, group_size), (group_size,), eps=eps)
    return weight * xg.view(*prefix, d)
