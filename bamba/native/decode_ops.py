"""Every decoder layer of a model for one decode token in one native call (``layer_step.c``'s
``bamba_decode_layers``): Mamba layers as ``layer_ops.mamba_layer_step``, attention layers as
``attention_in_step``, rope, the cache write, decode attention and ``attention_out_step``.

The per-layer path costs a few milliseconds of Python and torch glue per token at batch 1
(module calls, argument checks, rope and cache ops), all of it running with cold caches after
the layers stream their weights; here that glue runs once per step. Eager CPU inference only:
torch.compile graphs and dispatch modes take the per-layer ops.

The caller describes each layer by its tensors in the order of ``MAMBA_LAYER_TENSORS`` or
``ATTENTION_LAYER_TENSORS`` (None for an absent bias), and its storage as ``LayerStorage``; rows
arrive as ``StepRows``.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import operator
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch

from bamba.cache_protocol import KVLayout
from bamba.native import library
from bamba.native.layer_ops import (ATTENTION_IN_TENSORS, ATTENTION_OUT_TENSORS, FFN_TENSORS,
                                    MAMBA_TENSORS, LayerDims, _float32_mask, _state_pool,
                                    _status, linear_formats)

MAMBA_LAYER_TENSORS = MAMBA_TENSORS + FFN_TENSORS
ATTENTION_LAYER_TENSORS = ATTENTION_IN_TENSORS + ATTENTION_OUT_TENSORS
# layer_step.c's enum order: every tensor of either kind of layer.
_SLOTS = MAMBA_LAYER_TENSORS + ATTENTION_IN_TENSORS[1:] + ATTENTION_OUT_TENSORS[:3]
_ATTENTION_SLOTS = [_SLOTS.index(name) for name in ATTENTION_LAYER_TENSORS]


def _in_slots(tensors: list[torch.Tensor | None], attention: bool) -> list:
    """A layer's tensors at their places in layer_step.c's enum (None elsewhere)."""
    if not attention:
        return list(tensors) + [None] * (len(_SLOTS) - len(tensors))
    slots: list[torch.Tensor | None] = [None] * len(_SLOTS)
    for slot, tensor in zip(_ATTENTION_SLOTS, tensors):
        slots[slot] = tensor
    return slots


class LayerStorage(NamedTuple):
    """A layer's state: conv and SSM pools ([slots, K-1, conv_dim], [slots, H, P, N]) of a
    Mamba layer, or key and value storage of an attention layer, where token row r of KV head
    g starts at element g * head_stride + r * token_stride (both layers alike)."""
    a: torch.Tensor
    b: torch.Tensor


class StepRows(NamedTuple):
    """One decode call's rows: state pool rows [M], positions [M] of the new tokens, rope
    cos/sin [M, rotary_dim] in the model dtype, token rows [M] the new keys go to, token rows
    [M, T] of positions 0..T-1 (T > every position); ``sources`` [M] (or None) the slot each
    run of rows on one slot reads its state from at its first row (copied into the run's slot
    first, the source left as it was: a pass that may be undone)."""
    slots: torch.Tensor
    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    write_rows: torch.Tensor
    read_rows: torch.Tensor
    sources: torch.Tensor | None = None


class FinalNorm(NamedTuple):
    """The model's final RMS norm, applied in the same call after the last layer: its weight
    [hidden] (the model dtype, contiguous) and epsilon."""
    weight: torch.Tensor
    eps: float


class Multipliers(NamedTuple):
    """Granite's factors inside the layers: each sublayer's output times ``residual`` before
    its residual sum, attention scores times ``attention`` (None: head_dim ** -0.5)."""
    residual: float = 1.0
    attention: float | None = None


class DecodeModel(ctypes.Structure):
    _fields_ = [("n_layers", ctypes.c_int64), ("attention", ctypes.c_void_p),
                ("tensors", ctypes.c_void_p), ("f32_masks", ctypes.c_void_p),
                ("formats", ctypes.c_void_p), ("expert_formats", ctypes.c_void_p),
                ("mamba_dims", ctypes.c_void_p), ("attention_dims", ctypes.c_void_p),
                ("pool_a", ctypes.c_void_p), ("pool_b", ctypes.c_void_p),
                ("conv_bf16", ctypes.c_int64), ("ssm_bf16", ctypes.c_int64),
                ("bf16", ctypes.c_int64), ("kv_head_stride", ctypes.c_int64),
                ("kv_token_stride", ctypes.c_int64), ("eps", ctypes.c_float),
                ("dt_min", ctypes.c_float), ("dt_max", ctypes.c_float),
                ("attention_scale", ctypes.c_float), ("final_norm", ctypes.c_void_p),
                ("final_eps", ctypes.c_float), ("residual_scale", ctypes.c_float)]


class DecodeRows(ctypes.Structure):
    _fields_ = [("M", ctypes.c_int64), ("T", ctypes.c_int64), ("rotary_dim", ctypes.c_int64),
                ("slot_limit", ctypes.c_int64), ("row_limit", ctypes.c_int64),
                ("slots", ctypes.c_void_p), ("lengths", ctypes.c_void_p),
                ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p),
                ("write_rows", ctypes.c_void_p), ("read_rows", ctypes.c_void_p),
                ("sources", ctypes.c_void_p)]


def _int64_array(values) -> ctypes.Array:
    values = list(values)
    return (ctypes.c_int64 * len(values))(*values)


def _pointer_array(tensors) -> ctypes.Array:
    addresses = [None if t is None else t.data_ptr() for t in tensors]
    return (ctypes.c_void_p * len(addresses))(*addresses)


def _check_storage(kinds: list[bool], storage: list[LayerStorage], mamba: LayerDims,
                   dtype: torch.dtype) -> tuple[int, int]:
    """One-line errors for storage that does not fit; returns the conv and SSM pool dtypes
    (1 = bf16)."""
    conv = [s for s, att in zip(storage, kinds) if not att]
    for (a, b), att in zip(storage, kinds):
        if att:
            if a.dtype != dtype or b.dtype != dtype or a.shape != b.shape or \
                    not a.is_contiguous() or not b.is_contiguous() or a.device.type != "cpu":
                raise ValueError(f"decode step: keys {tuple(a.shape)} {a.dtype} and values "
                                 f"{tuple(b.shape)} {b.dtype} must be alike, contiguous, of "
                                 f"the model dtype")
        elif a.shape[1:] != (mamba.conv_kernel - 1, mamba.conv_dim) or \
                b.shape[1:] != (mamba.heads, mamba.head_dim, mamba.d_state) or \
                not a.is_contiguous() or not b.is_contiguous():
            raise ValueError(f"decode step: conv pool {tuple(a.shape)} or SSM pool "
                             f"{tuple(b.shape)} does not fit the layers' {mamba} (contiguous)")
    if not conv:
        return 0, 0
    dtypes = {(a.dtype, b.dtype) for a, b in conv}
    if len(dtypes) != 1:
        raise ValueError(f"decode step: the state pools must share dtypes, got {dtypes}")
    return _state_pool(conv[0].a, "conv"), _state_pool(conv[0].b, "SSM")


_DTYPE = operator.attrgetter("dtype")


class _Built(NamedTuple):
    """A DecodeModel and what it was built from."""
    layers: list  # the caller's list of layers' tensors (identity)
    final: torch.Tensor | None  # the final norm's weight (identity)
    present: list[torch.Tensor]  # its tensors, None left out
    held: list[torch.Tensor]  # aliases of their storage: what the plan points into stays alive
    layout: tuple[list, list, list]  # their addresses, dtypes and contiguity
    storage: list[tuple]  # ``_storage_signature``
    pools: list[weakref.ref]  # the storage's tensors (identity; a cache outlives no call)
    static: tuple  # layer kinds, sizes, eps, dtype
    plan: tuple | None  # (DecodeModel, the arrays it points into), or None: not for the kernel
    checked_in: object | None  # the ``steady_weights`` scope that last checked it, if any


_STEADY = threading.local()  # .scope: this thread's ``steady_weights`` scope, if any


@contextlib.contextmanager
def steady_weights() -> Iterator[None]:
    """A promise from a loop of decode steps that runs no caller code between them: no
    weight is replaced (``.data =``, ``set_``, ``.to()``) while inside. A model's decode plan
    checked on the scope's first step then serves its later steps without reading every
    tensor's address again (~400 tensors, cold after the weights' stream: ~0.25 ms a token).
    Registrations (a new Parameter or submodule) are still seen; a scope entered inside
    another is the outer one. ``generate``, ``LLM.generate``, the server's engine (while it
    has work) and the ``generate`` / ``chat`` commands hold one."""
    if getattr(_STEADY, "scope", None) is not None:
        yield
        return
    _STEADY.scope = object()
    try:
        yield
    finally:
        _STEADY.scope = None


class PlanMemo:
    """Where a caller keeps the DecodeModel last built for its layers (the model's decode plan
    holds one, so it goes with the model): the next call with the same list, its tensors where
    they lay (address, dtype, contiguity) and the same storage reuses it, comparing lists
    instead of building the model again. The list must not change in place while it is
    remembered (pass a new one)."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last: _Built | None = None  # replaced whole, never changed: threads read it once


def _layout(present: list[torch.Tensor]) -> tuple[list, list, list]:
    # map: no Python loop per tensor (reading ~400 tensors' addresses after the weights'
    # stream evicted them from the caches is most of a memo hit's cost)
    return (list(map(torch.Tensor.data_ptr, present)), list(map(_DTYPE, present)),
            list(map(torch.Tensor.is_contiguous, present)))


def _storage_signature(storage: list[LayerStorage]) -> list[tuple]:
    return [(a.data_ptr(), a.dtype, a.shape, b.data_ptr(), b.dtype, b.shape) for a, b in storage]


def _references(storage: list[LayerStorage]) -> list[weakref.ref]:
    return list(map(weakref.ref, itertools.chain.from_iterable(storage)))


def _is_referent(reference: weakref.ref, tensor: torch.Tensor) -> bool:
    return reference() is tensor


def _plan(x: torch.Tensor, layers: list[list[torch.Tensor | None]], kinds: list[bool],
          storage: list[LayerStorage], mamba: LayerDims, attention: LayerDims, kv: KVLayout,
          eps: float, time_step_limit: tuple[float, float], memo: PlanMemo | None,
          final_norm: FinalNorm | None = None,
          multipliers: Multipliers = Multipliers(),
          expert_formats: Sequence[int] | None = None) -> tuple | None:
    """The DecodeModel of these layers and their storage, checked and built when ``memo``
    does not hold one for them as they are now; None when an input norm's dtype is not x's
    (the per-layer path then rounds as torch does). Inside a ``steady_weights`` scope that
    has checked the memo's plan, the same lists of layers and storage tensors reuse it
    unchecked (our caches never move their storage)."""
    final = None if final_norm is None else final_norm.weight
    expert_formats = _expert_formats(kinds, mamba, attention, expert_formats)
    static = (tuple(kinds), mamba, attention, kv, eps, tuple(time_step_limit), x.dtype,
              expert_formats,
              None if final_norm is None else final_norm.eps, multipliers)
    last = None if memo is None else memo.last
    scope = getattr(_STEADY, "scope", None)
    if last is not None and last.layers is layers and last.final is final and \
            last.static == static:
        if scope is not None and last.checked_in is scope and \
                all(map(_is_referent, last.pools, itertools.chain.from_iterable(storage))):
            return last.plan
        if _storage_signature(storage) == last.storage and \
                _layout(last.present) == last.layout:
            if scope is not None and memo is not None:
                memo.last = last._replace(pools=_references(storage), checked_in=scope)
            return last.plan
    plan = _build(x, layers, kinds, storage, mamba, attention, kv, eps, time_step_limit,
                  final_norm, multipliers, expert_formats)
    if memo is not None:
        present = [t for tensors in layers for t in tensors if t is not None] + \
            ([] if final is None else [final])
        memo.last = _Built(layers, final, present, [t.detach() for t in present], _layout(present),
                           _storage_signature(storage), _references(storage), static, plan,
                           scope)
    return plan


def _expert_formats(kinds: list[bool], mamba: LayerDims, attention: LayerDims,
                    given: Sequence[int] | None) -> tuple[int, ...]:
    """Each layer's experts' codes: ``given``, or its kind's dims'."""
    if given is None:
        return tuple((attention if att else mamba).expert_formats for att in kinds)
    if len(given) != len(kinds):
        raise ValueError(f"decode step: {len(given)} expert formats for {len(kinds)} layers")
    return tuple(given)


def _build(x: torch.Tensor, layers: list[list[torch.Tensor | None]], kinds: list[bool],
           storage: list[LayerStorage], mamba: LayerDims, attention: LayerDims, kv: KVLayout,
           eps: float, time_step_limit: tuple[float, float],
           final_norm: FinalNorm | None, multipliers: Multipliers,
           expert_formats: tuple[int, ...]) -> tuple | None:
    """``_plan`` without the memo: checks every tensor and storage, builds the C structs."""
    if any(tensors[0] is None or tensors[0].dtype != x.dtype for tensors in layers):
        return None  # an input norm of another dtype: the torch path rounds otherwise
    if final_norm is not None and (final_norm.weight.shape != (x.shape[1],) or
                                   final_norm.weight.dtype != x.dtype or
                                   not final_norm.weight.is_contiguous()):
        raise ValueError(f"decode step: the final norm's weight "
                         f"{tuple(final_norm.weight.shape)} {final_norm.weight.dtype} must be "
                         f"[{x.shape[1]}] of x's dtype, contiguous")
    layers = [_in_slots(tensors, attention) for tensors, attention in zip(layers, kinds)]
    masks = [_float32_mask(x, tensors, _SLOTS) for tensors in layers]
    formats = [linear_formats(tensors, _SLOTS, attention if att else mamba)
               for tensors, att in zip(layers, kinds)]
    conv_bf16, ssm_bf16 = _check_storage(kinds, storage, mamba, x.dtype)
    arrays = (_int64_array(map(int, kinds)),
              _pointer_array([t for tensors in layers for t in tensors]), _int64_array(masks),
              _int64_array(formats), _int64_array(expert_formats),
              _int64_array(mamba), _int64_array(attention),
              _pointer_array(s.a for s in storage), _pointer_array(s.b for s in storage))
    model = DecodeModel(len(layers), *(ctypes.addressof(a) for a in arrays), conv_bf16,
                        ssm_bf16, int(x.dtype == torch.bfloat16), kv.head_stride,
                        kv.token_stride, eps, *time_step_limit,
                        _attention_scale(attention, multipliers),
                        None if final_norm is None else final_norm.weight.data_ptr(),
                        0.0 if final_norm is None else final_norm.eps, multipliers.residual)
    # the arrays outlive the struct
    return model, arrays, _index_limits(kinds, storage, attention, kv)


def decode_layers(x: torch.Tensor, layers: list[list[torch.Tensor | None]], kinds: list[bool],
                  storage: list[LayerStorage], rows: StepRows, mamba: LayerDims,
                  attention: LayerDims, kv: KVLayout, eps: float,
                  time_step_limit: tuple[float, float],
                  memo: PlanMemo | None = None,
                  final_norm: FinalNorm | None = None,
                  multipliers: Multipliers = Multipliers(),
                  expert_formats: Sequence[int] | None = None) -> torch.Tensor | None:
    """x [M, hidden] (the embedded tokens) -> the last layer's output [M, hidden], normed by
    ``final_norm`` when given; every Mamba state and attention cache of ``storage`` advances
    by one token in place. None (and nothing done) when an input norm is not of x's dtype.
    ``kinds[i]`` is True for an attention layer; ``mamba`` and ``attention`` are the sizes of
    the two kinds of layers (zeros for a kind the model lacks); ``memo`` keeps the checked
    plan of ``layers`` from one call to the next (without it every call checks and builds);
    ``multipliers`` are Granite's residual and attention-score factors; ``expert_formats`` each
    layer's experts' codes (``LayerDims.expert_formats``: layers of one shape may hold their
    experts in different formats; None: each kind's dims say). Rows whose cos and sin are
    [M, 0] rotate nothing (attention without positions)."""
    if x.dim() != 2 or len(layers) != len(kinds) or len(storage) != len(kinds):
        raise ValueError(f"decode step: x {tuple(x.shape)}, {len(layers)} layers, "
                         f"{len(kinds)} kinds and {len(storage)} storages do not fit")
    plan = _plan(x, layers, kinds, storage, mamba, attention, kv, eps, time_step_limit, memo,
                 final_norm, multipliers, expert_formats)
    if plan is None:
        return None
    model = plan[0]
    m = x.shape[0]
    slots, positions = (rows.slots.to(torch.int64).contiguous(),
                        rows.positions.to(torch.int64).contiguous())
    write_rows, read_rows = (rows.write_rows.to(torch.int64).contiguous(),
                             rows.read_rows.to(torch.int64).contiguous())
    cos, sin = rows.cos.to(x.dtype).contiguous(), rows.sin.to(x.dtype).contiguous()
    sources = None if rows.sources is None else rows.sources.to(torch.int64).contiguous()
    if slots.shape != (m,) or positions.shape != (m,) or write_rows.shape != (m,) or \
            read_rows.dim() != 2 or read_rows.shape[0] != m or cos.shape != sin.shape or \
            (any(kinds) and (cos.dim() != 2 or cos.shape[0] != m)) or \
            (sources is not None and sources.shape != (m,)):
        shapes = [None if t is None else tuple(t.shape) for t in rows]
        raise ValueError(f"decode step: rows {shapes} do not fit {m} rows")
    lengths = positions + 1
    slot_limit, row_limit = plan[2]
    call = DecodeRows(m, read_rows.shape[1], cos.shape[-1] if any(kinds) else 0, slot_limit,
                      row_limit, slots.data_ptr(), lengths.data_ptr(), cos.data_ptr(),
                      sin.data_ptr(), write_rows.data_ptr(), read_rows.data_ptr(),
                      None if sources is None else sources.data_ptr())
    out, spare = torch.empty_like(x), torch.empty_like(x)
    status = library.load().bamba_decode_layers(
        ctypes.byref(model), x.data_ptr(), out.data_ptr(), spare.data_ptr(), ctypes.byref(call),
        torch.get_num_threads())
    if status in _INDEX_ERRORS:  # the kernel checks every index before it starts
        rows_seen = torch.cat((write_rows, read_rows.view(-1)))
        keys = next((s.a for s, att in zip(storage, kinds) if att), None)
        raise ValueError(_INDEX_ERRORS[status].format(
            last=read_rows.shape[1] - 1, low=int(rows_seen.min()), high=int(rows_seen.max()),
            keys=None if keys is None else tuple(keys.shape), kv=kv))
    _status("decode_layers", status)
    return out


def _attention_scale(attention: LayerDims, multipliers: Multipliers) -> float:
    if multipliers.attention is not None:
        return multipliers.attention
    return attention.head_dim ** -0.5 if attention.head_dim else 0.0


_INDEX_ERRORS = {
    -4: "decode step: slots must index the state pools",
    -5: "decode step: positions must lie in 0..{last}",
    -6: "decode step: token rows {low}..{high} lie outside the keys and values ({keys}, {kv})",
}


def _index_limits(kinds: list[bool], storage: list[LayerStorage], attention: LayerDims,
                  kv: KVLayout) -> tuple[int, int]:
    """The rows of the smallest state pool, and the largest token row whose keys and values
    (every KV head of it) lie inside the smallest attention layer's storage."""
    pools = [min(s.a.shape[0], s.b.shape[0]) for s, att in zip(storage, kinds) if not att]
    keys = [min(s.a.numel(), s.b.numel()) for s, att in zip(storage, kinds) if att]
    row_limit = -1
    if keys and kv.token_stride > 0:
        room = min(keys) - attention.head_dim - (attention.groups - 1) * kv.head_stride
        row_limit = room // kv.token_stride if room >= 0 else -1
    return min(pools, default=0), row_limit
