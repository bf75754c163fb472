"""GGUF's Q8_0 and Q4_0 blocks as our own int8 / int4 group-32 formats (``bamba.quant``),
exactly: a block is 32 weights sharing one float16 scale d, w = d * q with q an int8 (Q8_0) or
a 4-bit u stored with offset 8, q = u - 8 in [-8, 7] (Q4_0: symmetric, as int4 is). The low
nibbles of a Q4_0 block's 16 bytes hold its weights 0-15, the high nibbles 16-31.

The other blocks llama.cpp's files carry most (a Q4_K_M file: Q4_K, with Q6_K for some
tensors) read into the same formats (``KINDS``): Q5_0 (5-bit u, w = d (u - 16)) and Q6_K
(6-bit q in sub-blocks of 16, each scaled d * sc with an int8 sc) as int8, symmetric; Q4_1 and
Q4_K (w = d u + m, or d * sc * u - dmin * m per sub-block of 32 with 6-bit sc, m) as int4, and
Q5_1 and Q5_K (5-bit u) as int8 (Q5_K's held in its own 5 bits, ``held_bits`` 5: its qs and
qh bytes as the blocks hold them, q = u - 16), each with a float offset per 32 weights
(``bamba.quant.formats``: w = q * scale + offset). Q4_1 and Q5_1: q = u - 8 (or 16), float32 scale d and
offset the rest. Q4_K and Q5_K keep their scales in two levels as stored (a K table: d and dmin
float32 per 256 weights, sc and m a byte per 32; int4's q = u - 8, int5's u - 16): 4.75 bits a
Q4_K weight in memory where a float32 scale and offset per 32 took 6; so does Q6_K (its float32
d per 256 and signed sc byte per 16, one half), whose values stay in their 6 bits (a scheme
with ``held_bits`` 6: each half block's 64 bytes of low nibbles and 32 of high bit pairs, as
``formats.pack_six_bits`` lays them): 6.625 bits a weight held, where int8 values under a
float32 scale per 16 took 10. The weights come out as llama.cpp's own dequantization gives
them (up to one float32 rounding of an offset). IQ4_NL and IQ4_XS pick each weight among 16
non-linear levels (``bamba.quant.formats.IQ4_LEVELS``) under a float16 d per 32 weights
(IQ4_NL) or a d per 256 and a 6-bit signed scale per 32 (IQ4_XS): they load as int4 nibbles
indexing those levels (a scheme with
``levels``), exact, with float16 scales (IQ4_NL) or a K table of IQ4_XS's d and signed scales
as stored (Q6_K's layout, groups of 32): 4.5 and 4.375 bits a weight held (the file's 4.5 and
4.25).
"""

from __future__ import annotations


import sys

import numpy as np
import torch
from torch import nn

from bamba.checkpoint_writer import to_checkpoint_name
from bamba.quant.config import EXPERT_LINEARS, quantization_config_of
from bamba.quant.embedding import QuantizedEmbedding
from bamba.quant.experts import QuantizedExpertWeights, piece_target
from bamba.quant.formats import k_table, make_scheme, pack_ints, saved_scheme
from bamba.quant.linear import QuantizedLinear

GROUP = 32
SCHEMES = {"Q8_0": "int8", "Q4_0": "int4"}
BUFFERS = ("weight_packed", "weight_shape", "weight_scale", "weight_table")
# Each block type's format in ours: (int8 or int4, inputs a scale, float offsets, scales in two
# levels as the block holds them: a K table); IQ4's nibbles index its levels (LEVEL_KINDS).
KINDS = {"Q8_0": ("int8", 32, False, False), "Q4_0": ("int4", 32, False, False),
         "Q5_0": ("int8", 32, False, False), "Q6_K": ("int8", 16, False, True),
         "Q4_1": ("int4", 32, True, False), "Q4_K": ("int4", 32, True, True),
         "Q5_1": ("int8", 32, True, False), "Q5_K": ("int8", 32, True, True),
         "IQ4_NL": ("int4", 32, False, False), "IQ4_XS": ("int4", 32, False, True)}
LEVEL_KINDS = ("IQ4_NL", "IQ4_XS")
# int8 values held in the blocks' own bits (formats.pack_six_bits, pack_five_bits)
HELD_BITS = {"Q6_K": 6, "Q5_K": 5}


# The scales' dtype: the block's own float16 d, or float32 for d * sc (K-quants, IQ4_XS: their
# K tables hold the d as float32).
SCALE_DTYPES = {name: torch.float32 if name.endswith(("_K", "_XS")) else torch.float16
                for name in KINDS}


def kind_scheme(type_name: str):
    """Our scheme for GGUF block type ``type_name`` (a key of KINDS)."""
    name, group, offsets, two_level = KINDS[type_name]
    return make_scheme(name, group, symmetric=not offsets, offsets=offsets, two_level=two_level,
                       levels=type_name in LEVEL_KINDS,
                       held_bits=HELD_BITS.get(type_name))


def _half(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 field at byte ``at`` (even) of each block (blocks [..., bytes], contiguous,
    an even count) as float32 [..., 1], read as uint16 in place (copying the two bytes out
    first took ~4 of the 38 s a Q4_K_M file of granite-4.0-h-tiny's shape loaded in)."""
    return blocks.view(np.uint16)[..., at // 2:at // 2 + 1].view(np.float16).astype(np.float32)


def _packed_nibbles(runs: np.ndarray) -> torch.Tensor:
    """Runs of bytes [rows, ..., n] whose low nibbles hold n weights and high nibbles the next
    n (a Q4_0 block's 16 bytes, a Q4_K chunk's 32), the nibbles u = q + 8, as int4's packed
    words [rows, cols / 8]: weight 2p in byte p's low nibble, as compressed-tensors packs them,
    made from the bytes' pairs directly (through q and ``pack_ints`` it took ~8 of those 38 s)."""
    rows = runs.shape[0]
    if sys.byteorder != "little":  # the words' bytes are not in weight order there
        return pack_ints(torch.from_numpy(_nibbles(runs).astype(np.int8).reshape(rows, -1) - 8), 4)
    even, odd = runs[..., 0::2], runs[..., 1::2]
    packed = np.concatenate(((even & 0x0F) | (odd << 4), (even >> 4) | (odd & 0xF0)), axis=-1)
    return torch.from_numpy(np.ascontiguousarray(packed).reshape(rows, -1)).view(torch.int32)


def _nibbles(raw: np.ndarray) -> np.ndarray:
    """Bytes [..., n] as 2n 4-bit values: the low nibbles first, then the high ones."""
    return np.concatenate((raw & 0x0F, raw >> 4), axis=-1)


def _bits(raw: np.ndarray, count: int) -> np.ndarray:
    """Bit i of the little-endian bytes raw [..., count / 8], i < count, as [..., count]."""
    return np.unpackbits(raw, axis=-1, bitorder="little")[..., :count]


def _k_scales(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A K-quant super-block's 12 bytes of eight 6-bit scales and mins [..., 8] each, bytes:
    bytes 0-3 hold scales 0-3 (and the top bits of scales 4-7), bytes 4-7 mins 0-3 (and the top
    bits of mins 4-7), bytes 8-11 the low 4 bits of scales 4-7 (low nibbles) and mins 4-7
    (high)."""
    low, mid, top = raw[..., 0:4], raw[..., 4:8], raw[..., 8:12]
    scales = np.concatenate((low & 63, (top & 15) | ((low >> 6) << 4)), axis=-1)
    mins = np.concatenate((mid & 63, (top >> 4) | ((mid >> 6) << 4)), axis=-1)
    return scales, mins


def decode_blocks(raw: np.ndarray, type_name: str, rows: int, cols: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q, scale [rows, groups], offset float32 [rows, groups] or None) of a tensor's blocks
    of ``type_name`` (KINDS), w = q * scale (+ offset); q int8 [rows, cols], or for the int4
    kinds the packed words [rows, cols / 8]; for two-level kinds (q, the K table's rows uint8
    [rows, 2 * width], None)."""
    if type_name in SCHEMES:
        return (*block_values(raw, type_name, rows, cols), None)
    per_block = 256 if type_name.endswith(("_K", "_XS")) else 32
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, cols // per_block, -1)
    offset = None
    if type_name in ("Q4_1", "Q5_1"):  # d, m, [qh 4 bytes], 16 bytes of nibbles
        d, m = _half(b, 0), _half(b, 2)
        if type_name == "Q4_1":  # q = u - 8, the nibbles as they are
            scale, offset = d, m + 8 * d
            q = _packed_nibbles(b[..., -16:])
        else:
            u = _nibbles(b[..., -16:]).astype(np.int8) | \
                (_bits(b[..., 4:8], 32).astype(np.int8) << 4)
            scale, offset, q = d, m + 16 * d, u - 16
    elif type_name == "Q5_0":  # d, qh 4 bytes, 16 bytes of nibbles
        d = _half(b, 0)
        u = _nibbles(b[..., 6:22]).astype(np.int8) | \
            (_bits(b[..., 2:6], 32).astype(np.int8) << 4)
        q, scale = u - 16, d
    elif type_name in ("Q4_K", "Q5_K"):  # d, dmin, 12 scale bytes, [qh 32 bytes], qs 128 bytes
        d, dmin = _half(b, 0), _half(b, 2)
        sc, m = _k_scales(b[..., 4:16])
        qs = b[..., -128:].reshape(rows, -1, 4, 32)  # 4 chunks of 64 weights: low, high nibbles
        # the scales held as stored, a K table (int4's q = u - 8, int8's q = u)
        table = k_table(*(torch.from_numpy(np.ascontiguousarray(a).reshape(rows, -1))
                          for a in (d[..., 0], sc, dmin[..., 0], m))).reshape(rows, -1)
        if type_name == "Q4_K":
            return _packed_nibbles(qs), table, None
        # Q5_K: pack_five_bits' run is the block's qs, then its qh (q = u - 16)
        runs = np.concatenate((b[..., -128:], b[..., 16:48]), axis=-1)
        return torch.from_numpy(runs.reshape(rows, -1)), table, None
    elif type_name == "Q6_K":  # ql 128 bytes, qh 64 bytes, 16 int8 scales, d
        # each half (128 weights) is pack_six_bits' run: its 64 ql bytes, then its 32 qh ones
        runs = np.concatenate((b[..., 0:64], b[..., 128:160], b[..., 64:128], b[..., 160:192]),
                              axis=-1)
        sc = np.ascontiguousarray(b[..., 192:208]).reshape(rows, -1)  # signed bytes as stored
        table = k_table(torch.from_numpy(np.ascontiguousarray(_half(b, 208)[..., 0])),
                        torch.from_numpy(sc)).reshape(rows, -1)
        return torch.from_numpy(runs.reshape(rows, -1)), table, None
    elif type_name == "IQ4_NL":  # d, 16 bytes of nibbles (as Q4_0's) indexing IQ4_LEVELS
        scale = torch.from_numpy(np.ascontiguousarray(_half(b, 0)[..., 0]))
        return _packed_nibbles(b[..., 2:]), scale, None
    elif type_name == "IQ4_XS":  # d, scales_h (2 bits a group), scales_l (4), 8 runs of nibbles
        low = b[..., 4:8, None] >> np.array([0, 4], dtype=np.uint8) & 15  # [.., 4, 2]
        shifts = np.arange(0, 16, 2, dtype=np.uint16)
        high = (b[..., 2:4].copy().view(np.uint16) >> shifts) & 3  # [.., 8]
        sc = (low.reshape(rows, -1, 8) | (high.astype(np.uint8) << 4)).astype(np.int8) - 32
        table = k_table(torch.from_numpy(np.ascontiguousarray(_half(b, 0)[..., 0])),
                        torch.from_numpy(sc.reshape(rows, -1))).reshape(rows, -1)  # as Q6_K's
        runs = b[..., 8:].reshape(rows, -1, 8, 16)  # a group's 32 weights, as Q4_0's
        return _packed_nibbles(runs), table, None
    else:
        raise ValueError(f"GGUF block type {type_name} is not read quantized")
    to = lambda a: torch.from_numpy(np.ascontiguousarray(a).reshape(rows, -1))  # noqa: E731
    if not isinstance(q, torch.Tensor):
        q = to(q.astype(np.int8, copy=False)).view(rows, cols)
    return (q, to(scale.astype(np.float32)),
            None if offset is None else to(offset.astype(np.float32)))


def block_values(raw: np.ndarray, type_name: str, rows: int, cols: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale float16 [rows, cols / 32]) of a Q8_0 or Q4_0 tensor's bytes: Q8_0's q int8
    [rows, cols], Q4_0's the int4 packed words [rows, cols / 8]."""
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, cols // GROUP, -1)
    scale = np.ascontiguousarray(blocks.view(np.uint16)[..., 0]).view(np.float16)
    if type_name == "Q4_0":
        return _packed_nibbles(blocks[..., 2:]), torch.from_numpy(scale)
    q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8)
    return torch.from_numpy(q.reshape(rows, cols)), torch.from_numpy(scale)


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


def linear_tensors(q: torch.Tensor, scale: torch.Tensor, type_name: str,
                   offset: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A ``QuantizedLinear``'s or ``QuantizedEmbedding``'s buffers (names as compressed-tensors
    has them; with offsets ``weight_table``, scales and offsets [rows, 2, groups]) for q (int8
    values, or int4's packed words), scale and offset, of a block type of KINDS."""
    scheme = kind_scheme(type_name)
    if scheme.held_bits:  # bytes in pack_six_bits' / pack_five_bits' layout, as decode_blocks
        tensors = {"weight_packed": q, "weight_shape": torch.tensor(  # makes them
            [q.shape[0], q.shape[1] * 8 // scheme.held_bits], dtype=torch.int64)}
        tensors["weight_table"] = scale.reshape(q.shape[0], 2 if scheme.offsets else 1, -1)
        return tensors
    packed = q.dtype == torch.int32  # packed words, as decode_blocks makes some
    tensors = {"weight_packed": q if packed else pack_ints(q, scheme.bits),
               "weight_shape": torch.tensor([q.shape[0],
                                             q.shape[1] * (32 // scheme.bits if packed else 1)],
                                            dtype=torch.int64)}
    if scheme.levels:  # the nibbles held as bytes
        tensors["weight_packed"] = tensors["weight_packed"].view(torch.uint8)
    if scheme.two_level:  # a K table's rows, as decode_blocks gives them
        tensors["weight_table"] = scale.reshape(q.shape[0], 2 if scheme.offsets else 1, -1)
    elif offset is None:
        tensors["weight_scale"] = scale.to(SCALE_DTYPES[type_name])
    else:
        tensors["weight_table"] = torch.stack([scale.float(), offset.float()], dim=1)
    return tensors


def place_quantized(model: nn.Module, quantized: dict[str, str],
                    dtype: torch.dtype = torch.float32,
                    experts: dict[str, str] | None = None) -> None:
    """Put empty ``QuantizedLinear`` / ``QuantizedEmbedding`` modules, on the current default
    device, in place of the linears and the token embeddings whose weight ``quantized`` (our
    weight name -> GGUF block type of KINDS) holds, each in its block type's scheme, the
    embeddings looking up rows in ``dtype``; records the ``quantization_config`` that
    ``save_pretrained`` writes (a config group per scheme, naming its modules, a Granite MoE's
    stacked experts among them: ``experts`` maps each one's weight name to its block type;
    blocks with offsets, which compressed-tensors cannot describe, keep the model from being
    saved so)."""
    model_type = model.config.model_type
    by_scheme: dict = {}
    for name, type_name in quantized.items():
        path = name.removesuffix(".weight")
        parent, _, leaf = path.rpartition(".")
        dense, scheme = model.get_submodule(path), kind_scheme(type_name)
        scale_dtype = SCALE_DTYPES[type_name]
        if isinstance(dense, nn.Embedding):
            layer = QuantizedEmbedding(dense.num_embeddings, dense.embedding_dim, scheme,
                                       scale_dtype, output_dtype=dtype)
            target = "Embedding"
        else:
            layer = QuantizedLinear(dense.in_features, dense.out_features, scheme,
                                    dense.bias is not None, scale_dtype)
            target = to_checkpoint_name(path, model_type)
        setattr(model.get_submodule(parent), leaf, layer)
        by_scheme.setdefault(saved_scheme(scheme), []).append(target)
    experts = experts or {}
    if len(set(experts.values())) == 1:  # one group for them all, as `bamba quantize` writes
        by_scheme.setdefault(saved_scheme(kind_scheme(next(iter(experts.values())))),
                             []).append(EXPERT_LINEARS)
    else:  # each stacked module's pieces by name
        for name, type_name in experts.items():
            stacked = to_checkpoint_name(name.removesuffix(".weight"), model_type)
            by_scheme.setdefault(saved_scheme(kind_scheme(type_name)),
                                 []).append(piece_target(stacked))
    kept = [to_checkpoint_name(n, model_type) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not isinstance(m, QuantizedLinear)]
    model.quantization_config = quantization_config_of(
        ((targets, scheme) for scheme, targets in by_scheme.items()), kept)


def place_quantized_experts(model: nn.Module, stored: dict[str, str]) -> None:
    """Empty ``QuantizedExpertWeights``, each in its block type's scheme and scale dtype, on
    the current default device, in place of the stacked expert weights ``stored`` holds (our
    weight name -> GGUF block type of KINDS)."""
    for name, type_name in stored.items():
        path = name.removesuffix(".weight")
        parent, _, leaf = path.rpartition(".")
        dense = model.get_submodule(path)
        setattr(model.get_submodule(parent), leaf, QuantizedExpertWeights(
            dense.experts, dense.out_features, dense.in_features, kind_scheme(type_name),
            SCALE_DTYPES[type_name]))


def is_quantized_buffer(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in BUFFERS

