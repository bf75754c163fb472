"""Putting ``QuantizedLinear`` in place of a model's ``nn.Linear`` modules: empty ones (on the
meta device, to load a quantized checkpoint into) or quantized from the dense weights."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from bamba.quant.config import QuantConfig, QuantGroup, parse_quantization_config, \
    quantization_config_dict
from bamba.quant.formats import QuantScheme
from bamba.quant.linear import QuantizedLinear

Rename = Callable[[str], str]  # our module path -> the checkpoint's


def _class_names(module: nn.Module) -> tuple[str, ...]:
    return tuple(cls.__name__ for cls in type(module).__mro__)


def targeted_linears(model: nn.Module, qconfig: QuantConfig,
                     rename: Rename) -> dict[str, QuantGroup]:
    """Our module path -> its config group, for every ``nn.Linear`` the config quantizes.
    ValueError (naming the layer) when a group size does not divide its in_features or the
    lm_head tied to the embeddings is targeted."""
    found: dict[str, QuantGroup] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        group = qconfig.group_for(rename(name), _class_names(module))
        if group is None:
            continue
        size = group.scheme.group_size
        if size is not None and module.in_features % size:
            raise ValueError(f"group size {size} does not divide in_features "
                             f"{module.in_features} of {rename(name)}")
        tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
        if name == "lm_head" and tied:
            raise ValueError("lm_head is tied to the embeddings and cannot be quantized; "
                             "keep it in the ignore list")
        found[name] = group
    return found


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, layer)


def place_empty(model: nn.Module, qconfig: QuantConfig, rename: Rename,
                scale_dtype: Callable[[str], torch.dtype]) -> list[str]:
    """Replace each targeted linear by an empty ``QuantizedLinear`` on the current default
    device (meta for loading); ``scale_dtype(name)`` gives its scale's dtype. Returns the
    replaced module paths."""
    targets = targeted_linears(model, qconfig, rename)
    for name, group in targets.items():
        dense = model.get_submodule(name)
        n, k = dense.out_features, dense.in_features
        layer = QuantizedLinear(k, n, group.scheme, dense.bias is not None, scale_dtype(name),
                                per_tensor=group.per_tensor)
        _replace(model, name, layer)
    return list(targets)


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: QuantScheme, ignore: Iterable[str] = ("lm_head",),
                   rename: Rename = str) -> nn.Module:
    """Quantize ``model``'s linears in place (all but ``ignore``, compressed-tensors matching),
    recording the ``quantization_config`` that ``save_pretrained`` writes."""
    raw = quantization_config_dict(scheme, ignore)
    targets = targeted_linears(model, parse_quantization_config(raw), rename)
    for name in targets:
        _replace(model, name, QuantizedLinear.from_linear(model.get_submodule(name), scheme))
    model.quantization_config = raw
    return model
