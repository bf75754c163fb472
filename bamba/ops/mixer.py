"""The Mamba2 mixer's work between in_proj and out_proj, as pure functions over state pools.

Inference states live in pools (one row per sequence or slot): conv states [S, K-1, conv_dim]
and SSM states [S, H, P, N]. A batch's states are ``pool[rows]`` for a LongTensor ``rows``, or
the pools themselves (in batch order) when ``rows`` is None. ``mamba_decode_step`` reads them,
advances them by one token and writes them back in place, so one function covers the contiguous
cache of ``generate``, the engine's state slots and a compiled step.

The SSM state update, the heaviest part of a batched decode step, is ``ssd_pool_step`` over
``bamba.ops.ssd.ssd_step`` unless the caller passes another (a kernel that makes one pass over
each state, as ``bamba.native`` installs). The rest is plain tensor code that torch.compile
fuses when the whole step is compiled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from bamba.ops.conv import causal_conv1d, causal_conv1d_step
from bamba.ops.norm import gated_rms_norm
from bamba.ops.ssd import ssd_chunked, ssd_step


class MixerShape(NamedTuple):
    """The static sizes and constants of one Mamba2 mixer."""
    n_heads: int
    head_dim: int
    n_groups: int
    d_state: int
    time_step_limit: tuple[float, float]
    eps: float

    @property
    def d_inner(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.d_state


class MixerWeights(NamedTuple):
    """The mixer's parameters used between in_proj and out_proj."""
    conv_weight: torch.Tensor  # [conv_dim, K]
    conv_bias: torch.Tensor | None  # [conv_dim]
    dt_bias: torch.Tensor  # [H]
    A_log: torch.Tensor  # [H]
    D: torch.Tensor  # [H]
    norm_weight: torch.Tensor  # [d_inner]


def read_rows(pool: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The batch's rows of a state pool (the pool itself when ``rows`` is None)."""
    return pool if rows is None else pool.index_select(0, rows)


def write_rows(pool: torch.Tensor, rows: torch.Tensor | None, new: torch.Tensor) -> None:
    """Store the batch's new states into the pool."""
    if rows is None:
        pool.copy_(new)
    else:
        pool.index_copy_(0, rows, new.to(pool.dtype))


def time_steps(dt: torch.Tensor, dt_bias: torch.Tensor,
               limit: tuple[float, float]) -> torch.Tensor:
    """dt = clamp(softplus(dt + dt_bias), limit) in float32 (it feeds an exponential)."""
    return F.softplus(dt.float() + dt_bias.float()).clamp(*limit)


# An SSM pool update: (pool, rows, x, dt, A, B, C) -> y, as ``ssd_pool_step``.
PoolStep = Callable[..., torch.Tensor]
# The training conv + silu: (x, weight, bias, seq_idx) -> silu(causal conv of x).
ConvSilu = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None],
                    torch.Tensor]


def ssd_pool_step(pool: torch.Tensor, rows: torch.Tensor | None, x: torch.Tensor,
                  dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                  C: torch.Tensor) -> torch.Tensor:
    """Advance ``pool[rows]`` by one token (``ssd_step``) and store it back; y [B, H, P]."""
    state = read_rows(pool, rows)
    inplace = rows is None and state.dtype == torch.float32 and not state.requires_grad
    y, state = ssd_step(state, x, dt, A, B, C, inplace)
    if not inplace:
        write_rows(pool, rows, state)
    return y


def conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              seq_idx: torch.Tensor | None) -> torch.Tensor:
    """silu(causal conv of x) from a zero state (a whole sequence or packed row)."""
    return F.silu(causal_conv1d(x, weight, bias, None, seq_idx)[0])


def mamba_decode_step(zxbcdt: torch.Tensor, conv_pool: torch.Tensor, ssm_pool: torch.Tensor,
                      rows: torch.Tensor | None, w: MixerWeights, shape: MixerShape,
                      pool_step: PoolStep = ssd_pool_step) -> torch.Tensor:
    """One token through the mixer's middle: in_proj output [B, 2·d_inner + 2·G·N + H] ->
    gated, normalised y [B, d_inner] (float32), ready for out_proj. The batch's conv and SSM
    states (``pool[rows]``) are advanced in place, the SSM ones by ``pool_step``."""
    b = zxbcdt.shape[0]
    d_inner, gn = shape.d_inner, shape.n_groups * shape.d_state
    z, xbc, dt = zxbcdt.float().split([d_inner, shape.conv_dim, shape.n_heads], -1)
    xbc, conv_state = causal_conv1d_step(xbc, w.conv_weight, w.conv_bias,
                                         read_rows(conv_pool, rows))
    write_rows(conv_pool, rows, conv_state)
    x, B, C = F.silu(xbc).split([d_inner, gn, gn], -1)
    x = x.view(b, shape.n_heads, shape.head_dim)
    dt = time_steps(dt, w.dt_bias, shape.time_step_limit)
    A = -torch.exp(w.A_log.float())
    B, C = B.view(b, shape.n_groups, shape.d_state), C.view(b, shape.n_groups, shape.d_state)
    y = pool_step(ssm_pool, rows, x, dt, A, B, C)
    y = y + w.D.float()[:, None] * x  # D skip on x before dt scaling
    return gated_rms_norm(y.reshape(b, d_inner), z, w.norm_weight, shape.eps,
                          d_inner // shape.n_groups)


def mamba_prefill(zxbcdt: torch.Tensor,
                  pools: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None,
                  w: MixerWeights, shape: MixerShape, seq_idx: torch.Tensor | None,
                  scan_chunk: int, matmul_dtype: torch.dtype,
                  conv: ConvSilu | None = None) -> torch.Tensor:
    """A sequence (or chunk) through the mixer's middle: in_proj output [B, L, ...] -> gated,
    normalised y [B, L, d_inner] (float32). With ``pools`` (conv pool, SSM pool,
    rows) the scan starts from the batch's states and stores the final ones back; without, it
    starts from zero (training, or a forward pass without cache). ``seq_idx`` restarts conv and
    scan at each document of a packed row. Without ``pools`` (training) the conv + silu is
    ``conv`` (default ``conv_silu``)."""
    conv_pool, ssm_pool, rows = pools if pools is not None else (None, None, None)
    b, l, _ = zxbcdt.shape
    d_inner, gn = shape.d_inner, shape.n_groups * shape.d_state
    # Everything between in_proj and out_proj runs in float32: the scan wants it, and on a
    # CPU bf16 elementwise ops are slower than float32 ones (each converts per element).
    z, xbc, dt = zxbcdt.float().split([d_inner, shape.conv_dim, shape.n_heads], -1)
    if pools is None:
        xbc = (conv or conv_silu)(xbc, w.conv_weight, w.conv_bias, seq_idx)
    else:
        xbc, conv_state = causal_conv1d(xbc, w.conv_weight, w.conv_bias,
                                        read_rows(conv_pool, rows), seq_idx)
        xbc = F.silu(xbc)
    x, B, C = xbc.split([d_inner, gn, gn], -1)
    x = x.reshape(b, l, shape.n_heads, shape.head_dim)
    groups = (b, l, shape.n_groups, shape.d_state)
    y, ssm_state = ssd_chunked(
        x, time_steps(dt, w.dt_bias, shape.time_step_limit), -torch.exp(w.A_log.float()),
        B.reshape(groups), C.reshape(groups), scan_chunk,
        None if pools is None else read_rows(ssm_pool, rows), seq_idx, matmul_dtype)
    if pools is not None:
        write_rows(conv_pool, rows, conv_state)
        write_rows(ssm_pool, rows, ssm_state)
    y = y + w.D.float()[:, None] * x  # D skip on x before dt scaling
    return gated_rms_norm(y.reshape(b, l, d_inner), z, w.norm_weight, shape.eps,
                          d_inner // shape.n_groups)
