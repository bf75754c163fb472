"""Whole decoder layers for one decode token (``layer_step.c``), as torch operators.

``torch.ops.bamba.mamba_layer_step`` runs a Mamba decoder layer (norm, in_proj, conv, SSM
update, gated norm, out_proj, residual, then the feed-forward block) for a few rows in one
native call; ``torch.ops.bamba.ffn_step`` runs the feed-forward block alone (after an attention
mixer). Eager callers go through ``mamba_layer_step``/``ffn_step`` here, which call the library
directly (no dispatcher on the hot path); inside torch.compile they are the registered ops.

The layer's tensors come as one list in the order of ``MAMBA_TENSORS`` (``FFN_TENSORS`` are
its last six), None for an absent bias; its sizes as ``LayerDims``.
"""

from __future__ import annotations

import ctypes
import functools
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode
from torch.utils.flop_counter import register_flop_formula

MAMBA_TENSORS = ("input_norm", "in_proj", "in_proj_bias", "conv_weight", "conv_bias",
                 "dt_bias", "A_log", "D", "gate_norm", "out_proj", "out_proj_bias")
FFN_TENSORS = ("pre_ff_norm", "gate", "gate_bias", "up", "up_bias", "down", "down_bias")
MAX_ROWS = 16  # measured (bench shape, bf16): at 32 rows torch's matmuls win (115 vs 149 ms)


class LayerDims(NamedTuple):
    """The sizes layer_step.c needs, in its order (mixer sizes are 0 for ``ffn_step``)."""
    hidden: int
    d_inner: int
    conv_dim: int
    conv_kernel: int
    heads: int
    head_dim: int
    groups: int
    d_state: int
    ffn: int


def _library():
    from bamba.native import _library

    return _library()


# Tensors that must be in the layer's dtype (linear weights and biases); the others (norm
# weights, conv, dt_bias, A_log, D) may also be float32 in a bf16 layer.
_LINEAR_PARTS = frozenset(("in_proj", "in_proj_bias", "out_proj", "out_proj_bias", "gate",
                           "gate_bias", "up", "up_bias", "down", "down_bias"))


def _float32_mask(x: torch.Tensor, tensors: list[torch.Tensor | None],
                  names: tuple[str, ...]) -> int:
    """Check the tensors; return the bit mask of those kept float32 in a bf16 layer."""
    if x.dim() != 2 or not x.is_contiguous() or x.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"layer step: x must be a contiguous [rows, hidden] bf16/float32 "
                         f"tensor, got {tuple(x.shape)} {x.dtype}")
    if len(tensors) != len(names):
        raise ValueError(f"layer step: expected {len(names)} tensors, got {len(tensors)}")
    mask = 0
    for i, (name, t) in enumerate(zip(names, tensors)):
        if t is None:
            continue
        allowed = (x.dtype,) if name in _LINEAR_PARTS else (x.dtype, torch.float32)
        if t.dtype not in allowed or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"layer step: {name} must be a contiguous CPU tensor of "
                             f"{' or '.join(map(str, allowed))}, got {t.dtype}")
        mask |= int(t.dtype != x.dtype) << i
    return mask


_PREPARED: dict[tuple, tuple] = {}  # (addresses and layouts, dims, x dtype) -> C arrays, mask


def _prepared(x: torch.Tensor, tensors: list[torch.Tensor | None], dims: list[int],
              names: tuple[str, ...]) -> tuple:
    """The C arrays of the layer's tensor addresses and sizes, and its float32 mask; the
    tensors are checked the first time these addresses and dtypes are seen (the per-token
    call skips it)."""
    key = (tuple(None if t is None else (t.data_ptr(), t.dtype, t.is_contiguous())
                 for t in tensors), tuple(dims), x.dtype)
    entry = _PREPARED.get(key)
    if entry is None:
        mask = _float32_mask(x, tensors, names)
        if len(_PREPARED) > 4096:  # weights re-allocated many times over: start afresh
            _PREPARED.clear()
        addresses = (None if t is None else t.data_ptr() for t in tensors)
        entry = ((ctypes.c_void_p * len(tensors))(*addresses),
                 (ctypes.c_int64 * len(dims))(*dims), mask)
        _PREPARED[key] = entry
    elif x.dim() != 2 or not x.is_contiguous():
        _float32_mask(x, tensors, names)  # raises the one-line error
    return entry


def _state_pool(pool: torch.Tensor, name: str) -> int:
    if pool.dtype not in (torch.bfloat16, torch.float32) or not pool.is_contiguous():
        raise ValueError(f"layer step: the {name} pool must be contiguous bf16/float32")
    return int(pool.dtype == torch.bfloat16)


def _mamba_layer_step(x: torch.Tensor, conv_pool: torch.Tensor, ssm_pool: torch.Tensor,
                      rows: torch.Tensor, tensors: list[torch.Tensor | None], dims: list[int],
                      eps: float, dt_min: float, dt_max: float) -> torch.Tensor:
    pointers, sizes, mask = _prepared(x, tensors, dims, MAMBA_TENSORS + FFN_TENSORS)
    rows = rows.to(torch.int64).contiguous()
    d = LayerDims(*dims)
    if x.shape[1] != d.hidden or conv_pool.shape[1:] != (d.conv_kernel - 1, d.conv_dim) or \
            ssm_pool.shape[1:] != (d.heads, d.head_dim, d.d_state):
        raise ValueError(f"layer step: x {tuple(x.shape)}, conv pool {tuple(conv_pool.shape)} "
                         f"or SSM pool {tuple(ssm_pool.shape)} do not fit the layer's {d}")
    indices = rows.tolist()
    if not indices or len(indices) != x.shape[0] or min(indices) < 0 or \
            max(indices) >= min(ssm_pool.shape[0], conv_pool.shape[0]):
        raise ValueError(f"layer step: rows must be [{x.shape[0]}] indices into the state pools")
    out = torch.empty_like(x)
    status = _library().bamba_mamba_layer_step(
        pointers, sizes, int(x.dtype == torch.bfloat16), mask, eps, dt_min, dt_max,
        x.data_ptr(), out.data_ptr(), x.shape[0], conv_pool.data_ptr(),
        _state_pool(conv_pool, "conv"), ssm_pool.data_ptr(), _state_pool(ssm_pool, "SSM"),
        rows.data_ptr(), torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"mamba_layer_step: unsupported here (status {status})")
    return out


def _ffn_step(x: torch.Tensor, tensors: list[torch.Tensor | None], dims: list[int],
              eps: float) -> torch.Tensor:
    pointers, sizes, mask = _prepared(x, tensors, dims, FFN_TENSORS)
    if x.shape[1] != dims[0]:
        raise ValueError(f"ffn step: x {tuple(x.shape)} does not fit hidden size {dims[0]}")
    out = torch.empty_like(x)
    status = _library().bamba_ffn_step(
        pointers, sizes, int(x.dtype == torch.bfloat16), mask, eps, x.data_ptr(),
        out.data_ptr(), x.shape[0], torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"ffn_step: unsupported here (status {status})")
    return out


mamba_op = torch.library.custom_op("bamba::mamba_layer_step",
                                   mutates_args=("conv_pool", "ssm_pool"),
                                   device_types="cpu")(_mamba_layer_step)
ffn_op = torch.library.custom_op("bamba::ffn_step", mutates_args=(),
                                 device_types="cpu")(_ffn_step)


@mamba_op.register_fake
def _(x, conv_pool, ssm_pool, rows, tensors, dims, eps, dt_min, dt_max):
    return torch.empty_like(x)


@ffn_op.register_fake
def _(x, tensors, dims, eps):
    return torch.empty_like(x)


def _through_dispatcher() -> bool:
    """Whether to call the registered op rather than the library: inside torch.compile, or
    under a dispatch mode (FlopCounterMode...) that must see the op. The op costs ~100 us a
    call more, so the eager hot path skips it."""
    return torch.compiler.is_compiling() or is_in_torch_dispatch_mode()


def mamba_layer_step(x: torch.Tensor, conv_pool: torch.Tensor, ssm_pool: torch.Tensor,
                     rows: torch.Tensor, tensors: list[torch.Tensor | None], dims: LayerDims,
                     eps: float, time_step_limit: tuple[float, float]) -> torch.Tensor:
    """x [rows, hidden] -> the layer's output; ``conv_pool[rows]`` and ``ssm_pool[rows]``
    advance by one token in place."""
    args = (x, conv_pool, ssm_pool, rows, tensors, list(dims), eps, *time_step_limit)
    return mamba_op(*args) if _through_dispatcher() else _mamba_layer_step(*args)


def ffn_step(x: torch.Tensor, tensors: list[torch.Tensor | None], dims: LayerDims,
             eps: float) -> torch.Tensor:
    """x [rows, hidden] -> x + mlp(rmsnorm(x))."""
    args = (x, tensors, list(dims), eps)
    return ffn_op(*args) if _through_dispatcher() else _ffn_step(*args)


def _linear_flops(rows: int, dims: list[int], mixer: bool) -> int:
    """2 x rows x the layer's linear weights: what aten.mm would count for the same matmuls
    (torch's counter counts no elementwise work, so neither is the SSM update)."""
    d = LayerDims(*dims)
    weights = 3 * d.hidden * d.ffn
    if mixer:
        weights += d.hidden * (2 * d.d_inner + d.conv_dim + d.heads)
    return 2 * rows * weights


@register_flop_formula(torch.ops.bamba.mamba_layer_step)
def _(x_shape, *args, **kwargs) -> int:
    return _linear_flops(x_shape[0], args[4], mixer=True)


@register_flop_formula(torch.ops.bamba.ffn_step)
def _(x_shape, *args, **kwargs) -> int:
    return _linear_flops(x_shape[0], args[1], mixer=False)


@functools.cache
def fits(dtype: torch.dtype, dims: LayerDims) -> bool:
    """Whether layer_step.c takes a layer of these sizes in this dtype on this build (known
    once per process: the build does not change)."""
    from bamba.native import linear_available

    width = 32 if dtype == torch.bfloat16 else 16
    widths = [dims.hidden, dims.ffn] + ([dims.d_inner] if dims.d_inner else [])
    return dtype in (torch.bfloat16, torch.float32) and linear_available(dtype) and \
        all(w % width == 0 for w in widths)


def declare(lib: ctypes.CDLL) -> None:
    """Set the ctypes signatures of layer_step.c's functions."""
    i64, ptr, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    lib.bamba_mamba_layer_step.argtypes = [ptr, ptr, i32, i64, f32, f32, f32, ptr, ptr, i64,
                                           ptr, i32, ptr, i32, ptr, i32]
    lib.bamba_mamba_layer_step.restype = i32
    lib.bamba_ffn_step.argtypes = [ptr, ptr, i32, i64, f32, ptr, ptr, i64, i32]
    lib.bamba_ffn_step.restype = i32
