"""Where the layer and model decode steps find their weights: ``layer_tensors`` reads every
tensor of a decoder layer, in ``layer_ops``' orders, through each linear's ``kernel_weights()``
(its format and tensors), so a new weight format has one place to enter. ``DecodePlan`` is a
model's list of them, with the layer kinds and sizes the whole-model step needs."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from bamba.linear_protocol import DENSE, LinearWeights
from bamba.native import dispatch
from bamba.native.decode_ops import FinalNorm, PlanMemo
from bamba.native.layer_ops import FORMAT_BITS
from bamba.native.dispatch import LayerDims

# the linear formats layer_step.c reads
FORMATS = frozenset((DENSE, "fp8", "int8", "int4", "iq4", "int6", "int5"))

Tensors = list[torch.Tensor | None]


def linear_weights(linear: nn.Module) -> LinearWeights:
    """A linear's ``kernel_weights()``, or a plain ``nn.Linear``'s dense weight and bias."""
    offered = getattr(linear, "kernel_weights", None)
    return offered() if offered is not None else LinearWeights(DENSE, linear.weight, linear.bias)


def _linears(dtype: torch.dtype, *linears: nn.Module) -> Tensors | None:
    """``_read`` of these modules' weights."""
    return _read(dtype, [(linear_weights(linear), linear.in_features) for linear in linears])


def _read(dtype: torch.dtype, weights: list[tuple[LinearWeights, int]]) -> Tensors | None:
    """Weight, bias and scales (None when dense) of each linear (its weights and input
    width), or None when one's format, its quantized layout, or a quantized linear's bias
    dtype (not the layer's ``dtype``) is not what the layer steps read."""
    found: Tensors = []
    for w, in_features in weights:
        if w.format not in FORMATS or (w.format != DENSE and (
                not dispatch.quant_step_fits(w, in_features) or
                (w.bias is not None and w.bias.dtype != dtype))):
            return None
        found += [w.weight, w.bias, None if w.format == DENSE else w.scales]
    return found


def ffn_weights(ff: nn.Module) -> list[tuple[LinearWeights, int]] | None:
    """Gate, up and down of a feed-forward block with their input widths: a fused one's
    (Granite's ``input_linear``) gate and up are the halves of its output rows. None when a
    fused linear's scales are not one row per output (they cannot be split)."""
    if not hasattr(ff, "input_linear"):
        return [(linear_weights(linear), linear.in_features)
                for linear in (ff.gate_proj, ff.up_proj, ff.down_proj)]
    fused, width = linear_weights(ff.input_linear), ff.width
    if fused.scales is not None and fused.scales.shape[0] != 2 * width:
        return None
    k = ff.input_linear.in_features
    return [(fused.rows(0, width), k), (fused.rows(width, 2 * width), k),
            (linear_weights(ff.output_linear), ff.output_linear.in_features)]


class LayerTensors(NamedTuple):
    """A layer's tensors for ``layer_ops``: (Mamba layer, -, -) or (-, attention in,
    attention out); None where the layer has a linear the kernels cannot read."""
    mamba: Tensors | None
    attention_in: Tensors | None
    attention_out: Tensors | None

    def whole(self) -> Tensors | None:
        """The layer in ``decode_ops``' order, or None."""
        if self.mamba is not None:
            return self.mamba
        if self.attention_in is None or self.attention_out is None:
            return None
        return self.attention_in + self.attention_out


def expert_tensors(ff: nn.Module, dtype: torch.dtype) -> Tensors | None:
    """A Granite MoE block's router and experts' weights and scales
    (``layer_ops.EXPERT_TENSORS``), Nones without experts; None when the router is not a dense
    weight of ``dtype`` or an expert weight neither that nor a quantized layout the kernels
    read."""
    experts = getattr(ff, "experts", None)
    if experts is None:
        return [None] * 5
    router = linear_weights(experts.router.layer)
    if router.format != DENSE or router.bias is not None or router.weight.dtype != dtype:
        return None
    found: Tensors = [router.weight]
    for stacked in (experts.input_linear, experts.output_linear):
        w = linear_weights(stacked)
        if w.format == DENSE and w.weight.dtype == dtype:
            found += [w.weight, None]
        elif w.format != DENSE and dispatch.quant_step_fits(w, stacked.in_features):
            found += [w.weight, w.scales]
        else:
            return None
    return found


def layer_tensors(layer: nn.Module) -> LayerTensors:
    dtype = layer.input_layernorm.weight.dtype
    parts = ffn_weights(layer.feed_forward)
    ffn = None if parts is None else _read(dtype, parts)
    experts = expert_tensors(layer.feed_forward, dtype)
    ffn = None if ffn is None or experts is None else ffn + experts
    ffn = None if ffn is None else [layer.pre_ff_layernorm.weight, *ffn]
    if layer.layer_type == "mamba":
        m = layer.mamba
        ends = _linears(dtype, m.in_proj, m.out_proj)
        if ends is None or ffn is None:
            return LayerTensors(None, None, None)
        return LayerTensors([layer.input_layernorm.weight, *ends[:3], m.conv1d.weight,
                             m.conv1d.bias, m.dt_bias, m.A_log, m.D, m.norm.weight, *ends[3:],
                             *ffn], None, None)
    a = layer.self_attn
    qkv, o = _linears(dtype, a.q_proj, a.k_proj, a.v_proj), _linears(dtype, a.o_proj)
    return LayerTensors(None, None if qkv is None else [layer.input_layernorm.weight, *qkv],
                        None if o is None or ffn is None else o + ffn)


def layer_dims(layer: nn.Module) -> LayerDims:
    """The sizes layer_step.c needs of a decoder layer."""
    h, ffn = layer.input_layernorm.weight.shape[0], layer.feed_forward.width
    experts = getattr(layer.feed_forward, "experts", None)
    mixture = (0, 0, 0, 0) if experts is None else \
        (experts.input_linear.experts, experts.top_k, experts.output_linear.in_features,
         _expert_formats(experts))
    if layer.layer_type != "mamba":
        a = layer.self_attn
        return LayerDims(h, 0, 0, 0, a.n_heads, a.head_dim, a.n_kv, 0, ffn, *mixture)
    m = layer.mamba
    return LayerDims(h, m.d_inner, m.conv_dim, m.conv1d.kernel_size[0], m.n_heads, m.head_dim,
                     m.n_groups, m.d_state, ffn, *mixture)


def _expert_formats(experts: nn.Module) -> int:
    """``LayerDims.expert_formats`` of a mixture's two stacked weights (0 for a dense one and
    for a layout the steps do not read, which ``expert_tensors`` then refuses)."""
    codes = []
    for stacked in (experts.input_linear, experts.output_linear):
        w = linear_weights(stacked)
        codes.append(0 if w.format == DENSE else
                     dispatch.quant_step_code(w, stacked.in_features) or 0)
    return codes[0] | codes[1] << FORMAT_BITS


NO_LAYER = LayerDims(*[0] * len(LayerDims._fields))  # a kind of layer the model lacks


class DecodePlan(NamedTuple):
    """What the whole-model decode step needs of a model's layers, built when the model's
    registrations count was ``generation``."""
    generation: int
    kinds: list[bool]  # True for an attention layer
    dims: tuple[LayerDims | None, LayerDims | None]  # (Mamba, attention) layers' sizes
    expert_formats: tuple[int, ...]  # each layer's experts' codes (the dims' vary by layer)
    tensors: list[Tensors] | None  # every layer's, or None when a layer's are unreadable
    memo: PlanMemo  # the whole-model step's checked C structs for ``tensors``
    final_norm: FinalNorm | None  # the final norm, when the step may apply it

    @classmethod
    def build(cls, layers: nn.ModuleList, final_norm: nn.Module | None, generation: int,
              hooked: bool = False) -> DecodePlan:
        """``final_norm``: the model's final RMS norm, or None when the step must leave it to
        its module (a class of the user's, a hook on it); ``hooked``: a forward hook sits in
        the layers (no tensors then: the layers run one by one)."""
        kinds = [layer.layer_type == "attention" for layer in layers]
        every = [layer_dims(layer) for layer in layers]
        dims = tuple(next((d for d, k in zip(every, kinds) if k == kind), None)
                     for kind in (False, True))
        # the step takes one shape per kind; each layer's experts in a format of their own (a
        # Q4_K_M file's down experts are Q6_K in half its layers, Q4_K in the others)
        uniform = all(d._replace(expert_formats=0) == dims[k]._replace(expert_formats=0)
                      for d, k in zip(every, kinds))
        tensors = None if hooked or not uniform else \
            [layer_tensors(layer).whole() for layer in layers]
        if tensors is not None and None in tensors:
            tensors = None
        return cls(generation, kinds, dims, tuple(d.expert_formats for d in every), tensors,
                   PlanMemo(),
                   None if final_norm is None else FinalNorm(final_norm.weight, final_norm.eps))
