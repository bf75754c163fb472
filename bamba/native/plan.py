"""Where the layer and model decode steps find their weights: ``layer_tensors`` reads every
tensor of a decoder layer, in ``layer_ops``' orders, through each linear's ``kernel_weights()``
(its format and tensors), so a new weight format has one place to enter. ``DecodePlan`` is a
model's list of them, with the layer kinds and sizes the whole-model step needs."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from bamba.linear_protocol import DENSE, LinearWeights
from bamba.native.dispatch import LayerDims

FORMATS = frozenset((DENSE,))  # the linear formats layer_step.c reads

Tensors = list[torch.Tensor | None]


def linear_weights(linear: nn.Module) -> LinearWeights:
    """A linear's ``kernel_weights()``, or a plain ``nn.Linear``'s dense weight and bias."""
    offered = getattr(linear, "kernel_weights", None)
    return offered() if offered is not None else LinearWeights(DENSE, linear.weight, linear.bias)


def _linears(*linears: nn.Module) -> Tensors | None:
    """Weight and bias of each linear, or None when one's format is not one the kernels read."""
    found: Tensors = []
    for linear in linears:
        w = linear_weights(linear)
        if w.format not in FORMATS:
            return None
        found += [w.weight, w.bias]
    return found


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


def layer_tensors(layer: nn.Module) -> LayerTensors:
    ff = layer.feed_forward
    ffn = _linears(ff.gate_proj, ff.up_proj, ff.down_proj)
    ffn = None if ffn is None else [layer.pre_ff_layernorm.weight, *ffn]
    if layer.layer_type == "mamba":
        m = layer.mamba
        ends = _linears(m.in_proj, m.out_proj)
        if ends is None or ffn is None:
            return LayerTensors(None, None, None)
        return LayerTensors([layer.input_layernorm.weight, *ends[:2], m.conv1d.weight,
                             m.conv1d.bias, m.dt_bias, m.A_log, m.D, m.norm.weight, *ends[2:],
                             *ffn], None, None)
    a = layer.self_attn
    qkv, o = _linears(a.q_proj, a.k_proj, a.v_proj), _linears(a.o_proj)
    return LayerTensors(None, None if qkv is None else [layer.input_layernorm.weight, *qkv],
                        None if o is None or ffn is None else o + ffn)


def layer_dims(layer: nn.Module) -> LayerDims:
    """The sizes layer_step.c needs of a decoder layer."""
    ff, h = layer.feed_forward, layer.input_layernorm.weight.shape[0]
    if layer.layer_type != "mamba":
        a = layer.self_attn
        return LayerDims(h, 0, 0, 0, a.n_heads, a.head_dim, a.n_kv, 0, ff.gate_proj.out_features)
    m = layer.mamba
    return LayerDims(h, m.d_inner, m.conv_dim, m.conv1d.kernel_size[0], m.n_heads, m.head_dim,
                     m.n_groups, m.d_state, ff.gate_proj.out_features)


NO_LAYER = LayerDims(*[0] * 9)  # the sizes of a kind of layer the model lacks


class DecodePlan(NamedTuple):
    """What the whole-model decode step needs of a model's layers, built when the model's
    registrations count was ``generation``."""
    generation: int
    kinds: list[bool]  # True for an attention layer
    dims: tuple[LayerDims | None, LayerDims | None]  # (Mamba, attention) layers' sizes
    tensors: list[Tensors] | None  # every layer's, or None when a layer's are unreadable

    @classmethod
    def build(cls, layers: nn.ModuleList, generation: int) -> DecodePlan:
        kinds = [layer.layer_type == "attention" for layer in layers]
        dims = tuple(next((layer_dims(layer) for layer, k in zip(layers, kinds) if k == kind),
                          None) for kind in (False, True))
        tensors = [layer_tensors(layer).whole() for layer in layers]
        return cls(generation, kinds, dims, None if None in tensors else tensors)
