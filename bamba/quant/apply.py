"""Putting quantized modules in place of a model's ``nn.Linear`` and ``nn.Embedding`` modules
(``QuantizedLinear``, ``QuantizedEmbedding``) and a Granite MoE's stacked experts
(``QuantizedExpertWeights``): empty ones (on the meta device, to load a quantized checkpoint
into) or quantized from the dense weights."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from bamba.model import ExpertWeights, Router
from bamba.quant.config import QuantConfig, QuantGroup, parse_quantization_config, \
    quantization_config_dict
from bamba.quant.embedding import QuantizedEmbedding
from bamba.quant.experts import STACKED_CLASSES, QuantizedExpertWeights, piece_modules
from bamba.quant.formats import QuantScheme, saved_scheme, unpack_ints
from bamba.quant.linear import QuantizedLinear

Rename = Callable[[str], str]  # our module path -> the checkpoint's
QUANTIZABLE = (nn.Linear, nn.Embedding)
# A Granite MoE's router as a quantization_config sees it: transformers' module holding a bare
# weight (our Router's linear), so "Linear" never targets it; llm-compressor ignores it by name.
ROUTER_CLASSES = ("GraniteMoeHybridTopKRouter",)


def _class_names(module: nn.Module) -> tuple[str, ...]:
    return tuple(cls.__name__ for cls in type(module).__mro__)


def _input_width(module: nn.Module) -> tuple[str, int]:
    """The width a group of inputs divides: a linear's in_features, an embedding's rows."""
    if isinstance(module, nn.Embedding):
        return "embedding_dim", module.embedding_dim
    return "in_features", module.in_features


def targeted_modules(model: nn.Module, qconfig: QuantConfig, rename: Rename,
                     experts: bool = False) -> dict[str, QuantGroup]:
    """Our module path -> its config group, for every ``nn.Linear`` and ``nn.Embedding`` the
    config quantizes, and with ``experts`` every stacked expert weight whose per-expert linears
    (``bamba.quant.experts``) it quantizes. ValueError (naming the module) when a group size
    does not divide its input width (an embedding's: its rows) or an lm_head tied to the
    embeddings is targeted."""
    found: dict[str, QuantGroup] = {}
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    routers = {f"{name}.layer" for name, module in model.named_modules()
               if isinstance(module, Router)}
    for name, module in model.named_modules():
        if name in routers:  # transformers' router is no Linear: it matches by its own name
            group = qconfig.group_for(rename(name.removesuffix(".layer")), ROUTER_CLASSES)
        elif isinstance(module, QUANTIZABLE):
            group = qconfig.group_for(rename(name), _class_names(module))
        elif experts and isinstance(module, ExpertWeights):
            group = qconfig.group_for(piece_modules(rename(name), 1)[0], ("Linear",))
        else:
            continue
        if group is None:
            continue
        size = group.scheme.group_size
        what, width = _input_width(module)
        if size is not None and width % size:
            raise ValueError(f"group size {size} does not divide {what} {width} of "
                             f"{rename(name)}")
        if tied and name == "lm_head":  # (a tied table quantized: the head reads it so)
            raise ValueError(f"{rename(name)} is tied to the embeddings and cannot be "
                             f"quantized apart from them; keep it in the ignore list")
        if isinstance(module, ExpertWeights) and group.per_tensor:
            raise ValueError(f"{rename(name)}: experts take a scale per channel or group, "
                             f"not one per tensor")
        if isinstance(module, ExpertWeights) and not group.scheme.symmetric:
            raise ValueError(f"{rename(name)}: experts with zero points (asymmetric) are not "
                             f"supported; give the experts a symmetric scheme of their own")
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


def place_stored_experts(model: nn.Module, qconfig: QuantConfig, rename: Rename,
                         stored_scale: Callable[[str], torch.dtype | None]) -> None:
    """Empty ``QuantizedExpertWeights`` (current default device) for each stacked expert
    weight a checkpoint holds quantized: ``stored_scale(name)`` gives the dtype of the scale
    stored beside module ``name`` (checkpoint naming), None when there is none; a scale beside
    the first per-expert piece, or beside the stack (llm-compressor's first Granite recipe),
    marks quantized experts, in the scheme the config gives that module. ValueError when it
    gives none."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, ExpertWeights):
            continue
        stacked = rename(name)
        layouts = ((piece_modules(stacked, 1)[0], ("Linear",)), (stacked, STACKED_CLASSES))
        found = next(((n, classes) for n, classes in layouts if stored_scale(n) is not None),
                     None)
        if found is None:
            continue
        group = qconfig.group_for(*found)
        if group is None or group.per_tensor:
            raise ValueError(f"{stacked} is stored quantized but quantization_config gives it "
                             f"no scheme with a scale per channel or group")
        if not group.scheme.symmetric:
            raise ValueError(f"{stacked}: experts with zero points (asymmetric) are not "
                             f"supported")
        _replace(model, name, QuantizedExpertWeights(
            module.experts, module.out_features, module.in_features, group.scheme,
            stored_scale(found[0])))


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: QuantScheme, ignore: Iterable[str] = ("lm_head",),
                   rename: Rename = str, lm_head: QuantScheme | None = None,
                   embedding: QuantScheme | None = None,
                   experts: QuantScheme | None = None) -> nn.Module:
    """Quantize ``model``'s linears (a Granite MoE's experts among them) in place (all but
    ``ignore``, compressed-tensors matching), and with ``lm_head`` / ``embedding`` /
    ``experts`` those in schemes of their own (a head tied to the embeddings is untied when
    it is quantized; with the table alone quantized it stays tied, reading the quantized
    table), recording the ``quantization_config`` that ``save_pretrained`` writes."""
    raw = quantization_config_dict(scheme, ignore, lm_head, embedding, experts)
    qconfig = parse_quantization_config(raw)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if tied and head_quantized(qconfig, rename):
        untie(model)
    targets = targeted_modules(model, qconfig, rename, experts=True)
    for name, group in targets.items():
        _replace(model, name, _quantized(model.get_submodule(name), group.scheme))
    if tied and model.config.tie_word_embeddings:  # the head reads the (quantized) table
        model.tie_weights()
    model.quantization_config = raw
    return model


def head_quantized(qconfig: QuantConfig, rename: Rename) -> bool:
    """Whether the config quantizes the lm_head (a tied one then gets its own copy)."""
    return qconfig.group_for(rename("lm_head"), ("Linear",)) is not None


def untie(model: nn.Module) -> None:
    """Give the lm_head a weight of its own, a copy of the embeddings it was tied to."""
    head = model.lm_head
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.config = model.config.replace(tie_word_embeddings=False)


def _quantized(dense: nn.Module, scheme: QuantScheme) -> nn.Module:
    if isinstance(dense, nn.Embedding):
        return QuantizedEmbedding.from_embedding(dense, scheme)
    if isinstance(dense, ExpertWeights):
        return QuantizedExpertWeights.from_stacked(dense.weight, scheme)
    return QuantizedLinear.from_linear(dense, scheme)


@torch.no_grad()
def dense_tensor(model: nn.Module, name: str, dtype: torch.dtype) -> torch.Tensor:
    """Tensor ``name`` of ``model`` as its dense twin holds it: a quantized module's ``weight``
    dequantized into ``dtype`` (experts stacked [E, out, in]), anything else as held."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf == "weight" and isinstance(module, QuantizedExpertWeights):
        return module.stacked(dtype)
    if leaf == "weight" and isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
        return module.dequantized_weight(dtype)
    return getattr(module, leaf)


def stored_ints(model: nn.Module, name: str
                ) -> tuple[torch.Tensor, torch.Tensor, QuantScheme] | None:
    """Tensor ``name``'s stored values when it is a symmetric int8 / int4 weight: (q int8 and scale
    float32, shaped as the dense twin's weight [.., rows, cols] and [.., rows, groups] (a
    group, or a whole row, of cols / groups inputs a scale), experts stacked [E, ...], and the
    scheme); None for anything else."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf != "weight" or not isinstance(
            module, (QuantizedLinear, QuantizedEmbedding, QuantizedExpertWeights)):
        return None
    scheme, (rows, cols) = module.scheme, module.dense_shape
    groups = 1 if scheme.group_size is None else cols // scheme.group_size
    if not scheme.packed or not scheme.symmetric:  # zero points or offsets
        return None
    # as saved: IQ4's levels and 6-bit values as int8 values, a K table as its float32 scales
    tensors, scheme = module.saved_tensors(), saved_scheme(scheme)
    if tuple(tensors["weight_scale"].shape) != (rows, groups):  # one scale for the whole matrix
        return None
    q = unpack_ints(tensors["weight_packed"], scheme.bits, cols)
    scale = tensors["weight_scale"].float()
    if isinstance(module, QuantizedExpertWeights):
        q = q.view(module.experts, module.out_features, cols)
        scale = scale.view(module.experts, module.out_features, -1)
    return q, scale, scheme


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype,
                     kinds: tuple[type, ...] = (QuantizedLinear, QuantizedEmbedding,
                                                QuantizedExpertWeights)) -> nn.Module:
    """Every quantized module (of ``kinds``) back to a dense ``nn.Linear`` / ``nn.Embedding`` /
    stacked experts holding its dequantized weight in ``dtype``, in place (for tools that take
    dense weights, and benchmarks comparing layouts); the recorded ``quantization_config``
    goes with them."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, kinds):
            continue
        if isinstance(module, QuantizedLinear):
            dense = nn.Linear(module.in_features, module.out_features,
                              bias=module.bias is not None, device="meta")
            if module.bias is not None:
                dense.bias = nn.Parameter(module.bias.to(dtype), requires_grad=False)
        elif isinstance(module, QuantizedEmbedding):
            dense = nn.Embedding(module.num_embeddings, module.embedding_dim, device="meta")
        elif isinstance(module, QuantizedExpertWeights):
            with torch.device("meta"):
                dense = ExpertWeights(module.experts, module.out_features, module.in_features)
        dense.weight = nn.Parameter(dense_tensor(model, f"{name}.weight", dtype),
                                    requires_grad=False)
        _replace(model, name, dense)
    if getattr(model.config, "tie_word_embeddings", False):  # one dense table again
        model.tie_weights()
    model.__dict__.pop("quantization_config", None)
    return model
