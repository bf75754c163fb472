"""Whole decoder layers for one decode token (``layer_step.c``), as torch operators.

``torch.ops.bamba.mamba_layer_step`` runs a Mamba decoder layer (norm, in_proj, conv, SSM
update, gated norm, out_proj, residual, then the feed-forward block) for a few rows in one
native call. An attention layer runs in two: ``attention_in_step`` (norm, q, k, v projections)
and, after rope and attention over the cache in torch, ``attention_out_step`` (o_proj, residual,
feed-forward block). Eager callers go through the functions here, which call the library
directly (no dispatcher on the hot path); inside torch.compile, or under a dispatch mode such
as FlopCounterMode, they call the registered ops.

A layer's tensors come as one list in the order of ``MAMBA_TENSORS``, ``ATTENTION_IN_TENSORS``
or ``ATTENTION_OUT_TENSORS``, None for an absent bias, and each linear's scales after its bias
(None for a dense weight; quantized weights in the layouts of ``quant_ops``); its sizes as
``LayerDims``.
"""

from __future__ import annotations

import ctypes

import torch

from torch.utils.flop_counter import register_flop_formula

from bamba.linear_protocol import LinearWeights
from bamba.native import library, quant_ops
from bamba.native.dispatch import LayerDims, through_dispatcher


def _linear(name: str) -> tuple[str, ...]:
    """A linear's weight, bias and scales (None for a dense weight) in a layer's tensors."""
    return name, f"{name}_bias", f"{name}_scales"


MAMBA_TENSORS = ("input_norm", *_linear("in_proj"), "conv_weight", "conv_bias", "dt_bias",
                 "A_log", "D", "gate_norm", *_linear("out_proj"))
# a Granite MoE layer's router [experts, hidden] (dense, the layer's dtype) and experts' fused
# gate-and-up [experts, 2 expert_ffn, hidden] and down [experts, hidden, expert_ffn] follow the
# MLP's (None without experts): dense in the layer's dtype, or quantized as one
# [experts * rows, cols] weight with its scales (the formats in ``LayerDims.expert_formats``)
EXPERT_LINEARS = ("experts_gate_up", "experts_down")
EXPERT_TENSORS = ("router", *_linear("experts_gate_up")[::2], *_linear("experts_down")[::2])
FFN_TENSORS = ("pre_ff_norm", *_linear("gate"), *_linear("up"), *_linear("down"),
               *EXPERT_TENSORS)
ATTENTION_IN_TENSORS = ("input_norm", *_linear("q"), *_linear("k"), *_linear("v"))
ATTENTION_OUT_TENSORS = _linear("o") + FFN_TENSORS

# The linears, each one's field in layer_step.c's formats word (the MLP's, then a Mamba layer's
# or an attention layer's: a layer has one or the other), and which of LayerDims' sizes is each
# one's input width.
LINEARS = ("in_proj", "out_proj", "gate", "up", "down", "q", "k", "v", "o")
_SLOT = {"gate": 0, "up": 1, "down": 2, "in_proj": 3, "out_proj": 4, "q": 3, "k": 4, "v": 5,
         "o": 6}
_INPUT_WIDTH = {"in_proj": "hidden", "out_proj": "d_inner", "gate": "hidden", "up": "hidden",
                "down": "ffn", "q": "hidden", "k": "hidden", "v": "hidden"}
FORMAT_BITS = 9  # layer_step.c's, a linear's field of the formats word
_QUANT_DTYPES = {torch.float8_e4m3fn: "fp8", torch.int32: "int", torch.uint8: "bytes"}

# Tensors that must be in the layer's dtype (dense linear weights and biases); the others (norm
# weights, conv, dt_bias, A_log, D) may also be float32 in a bf16 layer. Quantized weights and
# their scales are checked by ``linear_formats``.
_LINEAR_PARTS = frozenset([*(name for linear in LINEARS for name in _linear(linear)[:2]),
                           "router", *EXPERT_LINEARS])


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
        if t is None or name.endswith("_scales") or \
                (name in LINEARS + EXPERT_LINEARS and t.dtype in _QUANT_DTYPES):
            continue
        allowed = (x.dtype,) if name in _LINEAR_PARTS else (x.dtype, torch.float32)
        if t.dtype not in allowed or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"layer step: {name} must be a contiguous CPU tensor of "
                             f"{' or '.join(map(str, allowed))}, got {t.dtype}")
        mask |= int(t.dtype != x.dtype) << i
    return mask


def _input_width(name: str, dims: LayerDims) -> int:
    return dims.heads * dims.head_dim if name == "o" else getattr(dims, _INPUT_WIDTH[name])


def linear_formats(tensors: list[torch.Tensor | None], names: tuple[str, ...],
                   dims: LayerDims) -> int:
    """layer_step.c's formats word of a layer's linears (0 when all are dense); ValueError
    naming a quantized linear the kernels do not read."""
    word, by_name = 0, dict(zip(names, tensors))
    for name in LINEARS:
        weight, scales = by_name.get(name), by_name.get(f"{name}_scales")
        if weight is None or scales is None:
            continue
        k = _input_width(name, dims)
        kind = _QUANT_DTYPES.get(weight.dtype)
        if kind == "int":
            kind = "int4" if weight.dim() == 2 and weight.shape[1] * 8 == k else "int8"
        elif kind == "bytes" and weight.dim() == 2:  # IQ4's nibbles, six or five bits a value
            kind = {k // 2: "iq4", k // 4 * 3: "int6", k // 8 * 5: "int5"}.get(weight.shape[1])
        layout = None if kind is None else \
            quant_ops.quant_layout(LinearWeights(kind, weight, None, scales), k)
        code = None if layout is None else quant_ops.step_code(layout)
        if code is None:
            raise ValueError(f"layer step: {name} ({weight.dtype} {tuple(weight.shape)}, scales "
                             f"{tuple(scales.shape)} {scales.dtype}) is not a quantized weight "
                             f"of width {k} the kernels read")
        word |= code << (FORMAT_BITS * _SLOT[name])
    return word


_PREPARED: dict[tuple, tuple] = {}  # (addresses and layouts, dims, x dtype) -> C arrays, mask


def _prepared(x: torch.Tensor, tensors: list[torch.Tensor | None], dims: list[int],
              names: tuple[str, ...]) -> tuple:
    """The C arrays of the layer's tensor addresses and sizes, its float32 mask and formats
    word; the tensors are checked the first time these addresses and dtypes are seen (the
    per-token call skips it)."""
    key = (tuple(None if t is None else (t.data_ptr(), t.dtype, t.is_contiguous())
                 for t in tensors), tuple(dims), x.dtype)
    entry = _PREPARED.get(key)
    if entry is None:
        mask = _float32_mask(x, tensors, names)
        formats = linear_formats(tensors, names, LayerDims(*dims))
        if len(_PREPARED) > 4096:  # weights re-allocated many times over: start afresh
            _PREPARED.clear()
        addresses = (None if t is None else t.data_ptr() for t in tensors)
        entry = ((ctypes.c_void_p * len(tensors))(*addresses),
                 (ctypes.c_int64 * len(dims))(*dims), mask, formats)
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
                      eps: float, dt_min: float, dt_max: float,
                      residual_scale: float) -> torch.Tensor:
    pointers, sizes, mask, formats = _prepared(x, tensors, dims, MAMBA_TENSORS + FFN_TENSORS)
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
    status = library.load().bamba_mamba_layer_step(
        pointers, sizes, int(x.dtype == torch.bfloat16), mask, formats, eps, dt_min, dt_max,
        residual_scale, x.data_ptr(), out.data_ptr(), x.shape[0], conv_pool.data_ptr(),
        _state_pool(conv_pool, "conv"), ssm_pool.data_ptr(), _state_pool(ssm_pool, "SSM"),
        rows.data_ptr(), torch.get_num_threads())
    _status("mamba_layer_step", status)
    return out


def _attention_in_step(x: torch.Tensor, tensors: list[torch.Tensor | None], dims: list[int],
                       eps: float) -> torch.Tensor:
    pointers, sizes, mask, formats = _prepared(x, tensors, dims, ATTENTION_IN_TENSORS)
    d = LayerDims(*dims)
    if x.shape[1] != d.hidden:
        raise ValueError(f"attention step: x {tuple(x.shape)} does not fit hidden {d.hidden}")
    qkv = x.new_empty(x.shape[0], (d.heads + 2 * d.groups) * d.head_dim)
    _status("attention_in_step", library.load().bamba_attention_in_step(
        pointers, sizes, int(x.dtype == torch.bfloat16), mask, formats, eps, x.data_ptr(),
        qkv.data_ptr(), x.shape[0], torch.get_num_threads()))
    return qkv


def _attention_out_step(x: torch.Tensor, attn: torch.Tensor,
                        tensors: list[torch.Tensor | None], dims: list[int],
                        eps: float, residual_scale: float) -> torch.Tensor:
    pointers, sizes, mask, formats = _prepared(x, tensors, dims, ATTENTION_OUT_TENSORS)
    d = LayerDims(*dims)
    attn = attn.contiguous()
    if x.shape[1] != d.hidden or attn.shape != (x.shape[0], d.heads * d.head_dim) or \
            attn.dtype != x.dtype:
        raise ValueError(f"attention step: x {tuple(x.shape)} or attention output "
                         f"{tuple(attn.shape)} {attn.dtype} do not fit the layer's {d}")
    out = torch.empty_like(x)
    _status("attention_out_step", library.load().bamba_attention_out_step(
        pointers, sizes, int(x.dtype == torch.bfloat16), mask, formats, eps, residual_scale,
        x.data_ptr(),
        attn.data_ptr(), out.data_ptr(), x.shape[0], torch.get_num_threads()))
    return out


def _status(name: str, status: int) -> None:
    if status == -3:
        raise ValueError(f"{name}: rows on one state slot must be adjacent, at successive "
                         f"positions")
    if status != 0:
        raise RuntimeError(f"{name}: unsupported here (status {status})")


mamba_op = torch.library.custom_op("bamba::mamba_layer_step",
                                   mutates_args=("conv_pool", "ssm_pool"),
                                   device_types="cpu")(_mamba_layer_step)
attention_in_op = torch.library.custom_op("bamba::attention_in_step", mutates_args=(),
                                          device_types="cpu")(_attention_in_step)
attention_out_op = torch.library.custom_op("bamba::attention_out_step", mutates_args=(),
                                           device_types="cpu")(_attention_out_step)


@mamba_op.register_fake
def _(x, conv_pool, ssm_pool, rows, tensors, dims, eps, dt_min, dt_max, residual_scale):
    return torch.empty_like(x)


@attention_in_op.register_fake
def _(x, tensors, dims, eps):
    d = LayerDims(*dims)
    return x.new_empty(x.shape[0], (d.heads + 2 * d.groups) * d.head_dim)


@attention_out_op.register_fake
def _(x, attn, tensors, dims, eps, residual_scale):
    return torch.empty_like(x)


def mamba_layer_step(x: torch.Tensor, conv_pool: torch.Tensor, ssm_pool: torch.Tensor,
                     rows: torch.Tensor, tensors: list[torch.Tensor | None], dims: LayerDims,
                     eps: float, time_step_limit: tuple[float, float],
                     residual_scale: float = 1.0) -> torch.Tensor:
    """x [rows, hidden] -> the layer's output; ``conv_pool[rows]`` and ``ssm_pool[rows]``
    advance by one token in place. Each sublayer's output is multiplied by ``residual_scale``
    before its residual sum (Granite's residual_multiplier)."""
    args = (x, conv_pool, ssm_pool, rows, tensors, list(dims), eps, *time_step_limit,
            residual_scale)
    return mamba_op(*args) if through_dispatcher() else _mamba_layer_step(*args)


def attention_in_step(x: torch.Tensor, tensors: list[torch.Tensor | None], dims: LayerDims,
                      eps: float) -> torch.Tensor:
    """x [rows, hidden] -> [rows, (heads + 2 kv heads) head_dim]: q, k, v of rmsnorm(x)."""
    args = (x, tensors, list(dims), eps)
    return attention_in_op(*args) if through_dispatcher() else _attention_in_step(*args)


def attention_out_step(x: torch.Tensor, attn: torch.Tensor, tensors: list[torch.Tensor | None],
                       dims: LayerDims, eps: float, residual_scale: float = 1.0) -> torch.Tensor:
    """h = x + r o_proj(attn) -> h + r mlp(rmsnorm(h)); x [rows, hidden], attn [rows, heads·D],
    r = ``residual_scale``."""
    args = (x, attn, tensors, list(dims), eps, residual_scale)
    return attention_out_op(*args) if through_dispatcher() else _attention_out_step(*args)


# For torch's FlopCounterMode: 2 x rows x the linear weights the op multiplies, what aten.mm
# would count for the same matmuls (the counter counts no elementwise work, nor the SSM update).

@register_flop_formula(torch.ops.bamba.mamba_layer_step)
def _(x_shape, *args, **kwargs) -> int:
    d = LayerDims(*args[4])
    return 2 * x_shape[0] * d.hidden * (2 * d.d_inner + d.conv_dim + d.heads + 3 * d.ffn +
                                        _expert_width(d))


@register_flop_formula(torch.ops.bamba.attention_in_step)
def _(x_shape, *args, **kwargs) -> int:
    d = LayerDims(*args[1])
    return 2 * x_shape[0] * d.hidden * (d.heads + 2 * d.groups) * d.head_dim


@register_flop_formula(torch.ops.bamba.attention_out_step)
def _(x_shape, *args, **kwargs) -> int:
    d = LayerDims(*args[2])
    return 2 * x_shape[0] * d.hidden * (d.heads * d.head_dim + 3 * d.ffn + _expert_width(d))


def _expert_width(d: LayerDims) -> int:
    """Features a token's router and experts multiply by the hidden width (each expert's
    three matrices)."""
    return d.experts + 3 * d.top_k * d.expert_ffn
