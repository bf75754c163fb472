"""Putting quantized modules in place of a model's ``nn.Linear`` and ``nn.Embedding`` modules
(``QuantizedLinear``, ``QuantizedEmbedding``): empty ones (on the meta device, to load a
quantized checkpoint into) or quantized from the dense weights."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from bamba.quant.config import QuantConfig, QuantGroup, parse_quantization_config, \
    quantization_config_dict
from bamba.quant.embedding import QuantizedEmbedding
from bamba.quant.formats import QuantScheme
from bamba.quant.linear import QuantizedLinear

Rename = Callable[[str], str]  # our module path -> the checkpoint's
QUANTIZABLE = (nn.Linear, nn.Embedding)


def _class_names(module: nn.Module) -> tuple[str, ...]:
    return tuple(cls.__name__ for cls in type(module).__mro__)


def _input_width(module: nn.Module) -> tuple[str, int]:
    """The width a group of inputs divides: a linear's in_features, an embedding's rows."""
    if isinstance(module, nn.Linear):
        return "in_features", module.in_features
    return "embedding_dim", module.embedding_dim


def targeted_modules(model: nn.Module, qconfig: QuantConfig,
                     rename: Rename) -> dict[str, QuantGroup]:
    """Our module path -> its config group, for every ``nn.Linear`` and ``nn.Embedding`` the
    config quantizes. ValueError (naming the module) when a group size does not divide its
    input width (an embedding's: its rows) or embeddings tied to the lm_head are targeted."""
    found: dict[str, QuantGroup] = {}
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    for name, module in model.named_modules():
        if not isinstance(module, QUANTIZABLE):
            continue
        group = qconfig.group_for(rename(name), _class_names(module))
        if group is None:
            continue
        size = group.scheme.group_size
        what, width = _input_width(module)
        if size is not None and width % size:
            raise ValueError(f"group size {size} does not divide {what} {width} of "
                             f"{rename(name)}")
        if tied and (name == "lm_head" or isinstance(module, nn.Embedding)):
            raise ValueError(f"{rename(name)} is tied to the "
                             f"{'embeddings' if name == 'lm_head' else 'lm_head'} and cannot "
                             f"be quantized; keep it in the ignore list")
        found[name] = group
    return found


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, layer)


def place_empty(model: nn.Module, qconfig: QuantConfig, rename: Rename,
                scale_dtype: Callable[[str], torch.dtype],
                output_dtype: torch.dtype | None = None) -> list[str]:
    """Replace each targeted module by an empty quantized one on the current default device
    (meta for loading); ``scale_dtype(name)`` gives its scale's dtype, ``output_dtype`` an
    embedding's activations (default: its scale's). Returns the replaced module paths."""
    targets = targeted_modules(model, qconfig, rename)
    for name, group in targets.items():
        dense = model.get_submodule(name)
        if isinstance(dense, nn.Embedding):
            layer = QuantizedEmbedding(dense.num_embeddings, dense.embedding_dim, group.scheme,
                                       scale_dtype(name), group.per_tensor, output_dtype)
        else:
            layer = QuantizedLinear(dense.in_features, dense.out_features, group.scheme,
                                    dense.bias is not None, scale_dtype(name),
                                    per_tensor=group.per_tensor)
        _replace(model, name, layer)
    return list(targets)


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: QuantScheme, ignore: Iterable[str] = ("lm_head",),
                   rename: Rename = str, lm_head: QuantScheme | None = None,
                   embedding: QuantScheme | None = None) -> nn.Module:
    """Quantize ``model``'s linears in place (all but ``ignore``, compressed-tensors matching),
    and with ``lm_head`` / ``embedding`` those in schemes of their own, recording the
    ``quantization_config`` that ``save_pretrained`` writes."""
    raw = quantization_config_dict(scheme, ignore, lm_head, embedding)
    targets = targeted_modules(model, parse_quantization_config(raw), rename)
    for name, group in targets.items():
        dense = model.get_submodule(name)
        quantized = QuantizedEmbedding.from_embedding(dense, group.scheme) \
            if isinstance(dense, nn.Embedding) else QuantizedLinear.from_linear(dense, group.scheme)
        _replace(model, name, quantized)
    model.quantization_config = raw
    return model


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Every quantized module back to a dense ``nn.Linear`` / ``nn.Embedding`` holding its
    dequantized weight in ``dtype``, in place (for tools that take dense weights, such as the
    GGUF export); the recorded ``quantization_config`` goes with them."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            dense = nn.Linear(module.in_features, module.out_features,
                              bias=module.bias is not None, device="meta")
            if module.bias is not None:
                dense.bias = nn.Parameter(module.bias.to(dtype), requires_grad=False)
        elif isinstance(module, QuantizedEmbedding):
            dense = nn.Embedding(module.num_embeddings, module.embedding_dim, device="meta")
        else:
            continue
        dense.weight = nn.Parameter(module.dequantized_weight(dtype), requires_grad=False)
        _replace(model, name, dense)
    model.__dict__.pop("quantization_config", None)
    return model
