"""GGUF's Q8_0 and Q4_0 blocks as our own int8 / int4 group-32 formats (``bamba.quant``),
exactly: a block is 32 weights sharing one float16 scale d, w = d * q with q an int8 (Q8_0) or
a 4-bit u stored with offset 8, q = u - 8 in [-8, 7] (Q4_0: symmetric, as int4 is). The low
nibbles of a Q4_0 block's 16 bytes hold its weights 0-15, the high nibbles 16-31.
"""

from __future__ import annotations


import numpy as np
import torch
from torch import nn

from bamba.checkpoint_writer import to_checkpoint_name
from bamba.quant.apply import place_empty
from bamba.quant.config import parse_quantization_config, quantization_config_dict
from bamba.quant.experts import QuantizedExpertWeights
from bamba.quant.formats import make_scheme, pack_ints

GROUP = 32
SCHEMES = {"Q8_0": "int8", "Q4_0": "int4"}
BUFFERS = ("weight_packed", "weight_shape", "weight_scale")


def block_values(raw: np.ndarray, type_name: str, rows: int, cols: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [rows, cols], scale float16 [rows, cols / 32]) of a Q8_0 or Q4_0 tensor's bytes."""
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, cols // GROUP, -1)
    scale = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]
    body = np.ascontiguousarray(blocks[..., 2:])
    if type_name == "Q8_0":
        q = body.view(np.int8)
    else:
        q = np.concatenate((body & 0x0F, body >> 4), axis=-1).astype(np.int8) - 8
    return torch.from_numpy(q.reshape(rows, cols).copy()), torch.from_numpy(scale.copy())


def block_bytes(q: torch.Tensor, scale: torch.Tensor, type_name: str) -> np.ndarray | None:
    """The inverse of ``block_values``: Q8_0 or Q4_0 bytes [..., cols / 32 * block bytes] of
    q int8 [..., cols] and its scale [..., cols / 32], the scale in float16 as the blocks hold
    it (exact for bf16 and float16 scales in float16's normal range; float32 ones round, a
    relative 2^-11 at most); None when they do not fit (q outside Q4_0's [-8, 7], a scale
    float16 cannot hold: overflowing, or a nonzero one vanishing)."""
    half = scale.to(torch.float16)
    if not torch.isfinite(half).all() or ((half == 0) & (scale != 0)).any():
        return None
    if type_name == "Q4_0" and (q.min() < -8 or q.max() > 7):
        return None
    lead, cols = tuple(q.shape[:-1]), q.shape[-1]
    blocks = q.reshape(*lead, cols // GROUP, GROUP).numpy()
    if type_name == "Q8_0":
        body = blocks.astype(np.int8).view(np.uint8)
    else:  # weights 0-15 in the low nibbles, 16-31 in the high ones, stored as q + 8
        u = (blocks.astype(np.int16) + 8).astype(np.uint8)
        body = u[..., :GROUP // 2] | (u[..., GROUP // 2:] << 4)
    scales = half.numpy().reshape(*lead, cols // GROUP, 1).view(np.uint8)
    return np.concatenate((scales, body), axis=-1).reshape(*lead, -1)


def linear_tensors(q: torch.Tensor, scale: torch.Tensor, type_name: str) -> dict[str, torch.Tensor]:
    """A ``QuantizedLinear``'s or ``QuantizedEmbedding``'s buffers (names as compressed-tensors
    has them) for q and scale."""
    bits = make_scheme(SCHEMES[type_name], GROUP).bits
    return {"weight_packed": pack_ints(q, bits),
            "weight_shape": torch.tensor(q.shape, dtype=torch.int64), "weight_scale": scale}


def place_quantized(model: nn.Module, quantized: dict[str, str], embedding: str | None = None,
                    dtype: torch.dtype = torch.float32) -> None:
    """Put empty ``QuantizedLinear`` modules (group 32, float16 scales), on the current default
    device, in place of the linears whose weight ``quantized`` (our weight name -> GGUF type,
    one type) holds, and a ``QuantizedEmbedding`` for the token embeddings stored as GGUF type
    ``embedding`` (looking up rows in ``dtype``); records the ``quantization_config``
    ``save_pretrained`` writes."""
    (type_name,) = set(quantized.values())
    model_type = model.config.model_type
    modules = {name.removesuffix(".weight") for name in quantized}
    dense = [to_checkpoint_name(n, model_type) for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n not in modules]
    raw = quantization_config_dict(
        make_scheme(SCHEMES[type_name], GROUP), dense,
        embedding=None if embedding is None else make_scheme(SCHEMES[embedding], GROUP))
    place_empty(model, parse_quantization_config(raw),
                lambda n: to_checkpoint_name(n, model_type), lambda n: torch.float16, dtype)
    model.quantization_config = raw


def place_quantized_experts(model: nn.Module, stored: dict[str, str]) -> None:
    """Empty ``QuantizedExpertWeights`` (group 32, float16 scales), on the current default
    device, in place of the stacked expert weights ``stored`` holds (our weight name -> GGUF
    type)."""
    for name, type_name in stored.items():
        path = name.removesuffix(".weight")
        parent, _, leaf = path.rpartition(".")
        dense = model.get_submodule(path)
        setattr(model.get_submodule(parent), leaf, QuantizedExpertWeights(
            dense.experts, dense.out_features, dense.in_features,
            make_scheme(SCHEMES[type_name], GROUP)))


def is_quantized_buffer(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in BUFFERS

