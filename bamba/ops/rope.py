"""Rotary position embedding, NeoX "rotate half" style, optionally on part of each head."""

import torch


def rope_cos_sin(positions: torch.Tensor, rotary_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for integer positions [B, L] -> two [B, L, rotary_dim] tensors.

    Angles are computed in float32 (bf16 positions would lose integers past 256) and cast once.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32,
                                             device=positions.device) / rotary_dim))
    freqs = positions.float()[..., None] * inv_freq  # [B, L, R/2]
    angles = torch.cat((freqs, freqs), dim=-1)  # [B, L, R]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] channels of every head. x: [B, L, H, D]; cos, sin: [B, L, R]."""
    rotary_dim = cos.shape[-1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)
