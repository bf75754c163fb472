"""How our tensors sit in a GGUF file, both ways: names, shapes and the few transforms
llama.cpp's converter applies (``granitehybrid`` for Bamba and the Granite 4.0 hybrids,
``llama`` for the all-attention twin). A Granite model's fused gate-and-up weights are two GGUF
tensors each, ``ffn_gate`` and ``ffn_up`` (``_shexp``, ``_exps``), their halves (``pieces``).

Pure functions over torch tensors; the writer (``export``) and the reader (``reader``) share them
so a round trip is exact by construction.

Rotary layout: llama.cpp rotates adjacent channel pairs (its "NORM" rope) on the first
``rope.dimension_count`` channels of each head, where we (and transformers) rotate the two halves
of the rotary part. The q/k rows of each head are therefore reordered: llama.cpp's converter
interleaves the whole head; we interleave only the rotary part (``ROTARY_KEY`` records how many
channels, so a reader tells the two apart), which is what makes llama.cpp compute Bamba's partial
rotary correctly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from bamba.config import BambaConfig

HYBRID_ARCH = "granitehybrid"
LLAMA_ARCH = "llama"
ARCHITECTURES = (HYBRID_ARCH, LLAMA_ARCH)
# Leading channels of each q/k head stored interleaved; absent in files of llama.cpp's converter
# (they interleave the whole head).
ROTARY_KEY = "bamba.rope.interleaved_dimension_count"
# The scan's chunk length (llama.cpp has none; it changes only rounding, kept for exact round trips)
CHUNK_KEY = "bamba.ssm.chunk_size"

_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight",
           "model.final_layernorm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_LAYER = {"input_layernorm.weight": "attn_norm.weight",
          "pre_ff_layernorm.weight": "ffn_norm.weight",
          "feed_forward.gate_proj.weight": "ffn_gate.weight",
          "feed_forward.up_proj.weight": "ffn_up.weight",
          "feed_forward.down_proj.weight": "ffn_down.weight",
          "feed_forward.gate_proj.bias": "ffn_gate.bias",
          "feed_forward.up_proj.bias": "ffn_up.bias",
          "feed_forward.down_proj.bias": "ffn_down.bias",
          "self_attn.q_proj.weight": "attn_q.weight",
          "self_attn.k_proj.weight": "attn_k.weight",
          "self_attn.v_proj.weight": "attn_v.weight",
          "self_attn.o_proj.weight": "attn_output.weight",
          "self_attn.q_proj.bias": "attn_q.bias",
          "self_attn.k_proj.bias": "attn_k.bias",
          "self_attn.v_proj.bias": "attn_v.bias",
          "self_attn.o_proj.bias": "attn_output.bias",
          "mamba.in_proj.weight": "ssm_in.weight",
          "mamba.conv1d.weight": "ssm_conv1d.weight",
          "mamba.conv1d.bias": "ssm_conv1d.bias",
          "mamba.dt_bias": "ssm_dt.bias",
          "mamba.A_log": "ssm_a",
          "mamba.D": "ssm_d",
          "mamba.norm.weight": "ssm_norm.weight",
          "mamba.out_proj.weight": "ssm_out.weight"}
# Tensors llama.cpp keeps in float32 whatever the file type (vectors, the conv, the SSM scalars).
_KEEP_F32 = ("ssm_a", "ssm_d", "ssm_conv1d.weight", "ssm_norm.weight", "ffn_gate_inp.weight")


def gguf_name(ours: str) -> str:
    """Our state-dict name -> the GGUF tensor name."""
    if ours in _GLOBAL:
        return _GLOBAL[ours]
    prefix, _, rest = ours.partition("model.layers.")
    index, _, leaf = rest.partition(".")
    if prefix or not index.isdigit() or leaf not in _LAYER:
        raise ValueError(f"tensor {ours} has no GGUF name")
    return f"blk.{index}.{_LAYER[leaf]}"


class Piece(NamedTuple):
    """A GGUF tensor holding the slice ``rows`` of dimension ``dim`` of one of our tensors."""
    gguf: str
    rows: slice
    dim: int = 0


# Granite's feed-forward block (ours -> GGUF): the shared MLP's fused [gate | up] linear and its
# down projection (llama.cpp's "shexp" names beside experts), the experts' router, their fused
# [E, 2F, D] gate-and-up weights (split on dimension 1) and [E, D, F] down weights.
_GRANITE_FFN = {"feed_forward.input_linear.weight": ("ffn_gate", "ffn_up"),
                "feed_forward.output_linear.weight": ("ffn_down",),
                "feed_forward.experts.router.layer.weight": ("ffn_gate_inp",),
                "feed_forward.experts.input_linear.weight": ("ffn_gate_exps", "ffn_up_exps"),
                "feed_forward.experts.output_linear.weight": ("ffn_down_exps",)}


def pieces(ours: str, shape: tuple[int, ...], config: BambaConfig) -> list[Piece]:
    """The GGUF tensors our tensor ``ours`` (of ``shape``) is stored as: one, whole, except
    Granite's fused gate-and-up weights, whose halves are two (``ffn_gate`` and ``ffn_up``;
    ``*_shexp`` for the shared MLP of a model with experts, ``*_exps`` for the experts')."""
    prefix, _, rest = ours.partition("model.layers.")
    index, _, leaf = rest.partition(".")
    if prefix or leaf not in _GRANITE_FFN:
        return [Piece(gguf_name(ours), slice(0, shape[0] if shape else 1))]
    names = _GRANITE_FFN[leaf]
    if config.num_local_experts and not leaf.startswith("feed_forward.experts."):
        names = tuple(f"{name}_shexp" for name in names)
    dim = 1 if leaf.startswith("feed_forward.experts.input") else 0
    step = shape[dim] // len(names)
    return [Piece(f"blk.{index}.{name}.weight", slice(i * step, (i + 1) * step), dim)
            for i, name in enumerate(names)]


def piece_shape(shape: tuple[int, ...], piece: Piece) -> tuple[int, ...]:
    """The shape of ``piece`` of a tensor of ``shape`` (ours, before ``to_gguf``)."""
    if not shape:
        return shape
    sizes = list(shape)
    sizes[piece.dim] = piece.rows.stop - piece.rows.start
    return tuple(sizes)


def keeps_float32(name: str, shape: tuple[int, ...]) -> bool:
    """Whether the GGUF tensor ``name`` stays float32 in a bf16 or quantized file."""
    return len(shape) <= 1 or name.endswith(_KEEP_F32)


def interleave_order(head_dim: int, interleaved: int) -> torch.Tensor:
    """Channel order of one head in llama.cpp's layout: the first ``interleaved`` channels as
    pairs (i, i + interleaved/2), the rest unchanged. Position j holds our channel order[j]."""
    half = interleaved // 2
    first = torch.stack((torch.arange(half), torch.arange(half) + half), dim=1).reshape(-1)
    return torch.cat((first, torch.arange(interleaved, head_dim)))


def reorder_heads(weight: torch.Tensor, head_dim: int, order: torch.Tensor) -> torch.Tensor:
    """Rows of a q/k projection (or bias) reordered within each head of ``head_dim`` rows."""
    heads = weight.reshape(weight.shape[0] // head_dim, head_dim, *weight.shape[1:])
    return heads[:, order].reshape(weight.shape)


def to_gguf(ours: str, tensor: torch.Tensor, config: BambaConfig) -> torch.Tensor:
    """Our tensor as the GGUF file stores it (numpy dimension order)."""
    leaf = ours.split(".", 3)[-1]
    if leaf in ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                "self_attn.q_proj.bias", "self_attn.k_proj.bias"):
        return reorder_heads(tensor, config.head_dim,
                             interleave_order(config.head_dim, config.rotary_dim))
    if leaf == "mamba.A_log":
        return -torch.exp(tensor.float()).reshape(-1, 1)
    if leaf == "mamba.D":
        return tensor.reshape(-1, 1)
    if leaf == "mamba.conv1d.weight":
        return tensor.squeeze(1)
    if leaf == "mamba.norm.weight":
        return tensor.reshape(config.mamba_n_groups, -1)
    return tensor


def from_gguf(ours: str, tensor: torch.Tensor, config: BambaConfig,
              interleaved: int) -> torch.Tensor:
    """A GGUF tensor (numpy dimension order, float) as our parameter ``ours``;
    ``interleaved``: the leading channels of each q/k head the file stores as pairs."""
    leaf = ours.split(".", 3)[-1]
    if leaf in ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                "self_attn.q_proj.bias", "self_attn.k_proj.bias"):
        order = interleave_order(config.head_dim, interleaved)
        return reorder_heads(tensor, config.head_dim, torch.argsort(order))
    if leaf == "mamba.A_log":
        return torch.log(-tensor.double()).float().reshape(-1)
    if leaf == "mamba.D":
        return tensor.reshape(-1)
    if leaf == "mamba.conv1d.weight":
        return tensor.unsqueeze(1)
    if leaf == "mamba.norm.weight":
        return tensor.reshape(-1)
    return tensor


def gguf_shape(ours: str, shape: tuple[int, ...], config: BambaConfig) -> tuple[int, ...]:
    """The numpy-order shape ``to_gguf`` gives a tensor of our ``shape``."""
    return tuple(to_gguf(ours, torch.empty(shape, device="meta"), config).shape)
