"""Weight quantization in the compressed-tensors layout (what llm-compressor writes and vLLM
reads), as pure tensor functions.

Symmetric (the default): w ~= q * scale, one scale per output channel or per group of
``group_size`` inputs, scale = absmax / (448 for fp8, (2^bits - 1) / 2 for ints), as
compressed-tensors computes it. Asymmetric ints (llm-compressor's W4A16_ASYM, AWQ, GPTQ with
zero points): w ~= (q - zp) * scale, scale = (max - min) / (2^bits - 1) over a range holding 0,
an integer zero point zp per scale. Tensors (in memory == on disk):

- fp8: ``weight`` float8_e4m3fn [N, K], ``weight_scale`` [N, 1] (or [N, K // g]).
- int8 / int4: ``weight_packed`` int32 [N, ceil(K * bits / 32)], ``weight_shape`` int64 (N, K),
  ``weight_scale`` [N, K // group_size] or [N, 1]. Element j of a row is stored unsigned
  (q + 2^(bits-1)) at bit j * bits of the row's words (compressed-tensors' ``pack_to_int32``).
- asymmetric ints add ``weight_zero_point`` int32 [ceil(N * bits / 32), G]: the zero points
  [N, G] packed the same way down the columns (``pack_to_int32(..., packed_dim=0)``).
- int4 with ``levels`` (GGUF's IQ4_NL, IQ4_XS; in memory only): ``weight_packed`` uint8
  [N, K / 2], int4's nibbles as bytes, each an index into ``IQ4_LEVELS``; saved as int8.
- int8 with ``held_bits`` 6 (GGUF's Q6_K; in memory only): ``weight_packed`` uint8 [N, 3K / 4],
  values in [-32, 31] in ``pack_six_bits``' layout (Q6_K's own bytes); saved as int8. With 5
  (GGUF's Q5_K, offsets): uint8 [N, 5K / 8], values in [-16, 15] in ``pack_five_bits``'.

Scales take the weight's dtype (llm-compressor writes the model's dtype).
"""

from __future__ import annotations

import math
import sys
from typing import NamedTuple

import torch

SCHEME_NAMES = ("fp8", "int8", "int4")
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
WORD_BITS = 32


class QuantScheme(NamedTuple):
    """A weight format: ``name`` in SCHEME_NAMES, ``group_size`` None for one scale per output
    channel; ``symmetric`` False for ints with an integer zero point per scale
    (compressed-tensors' ``weight_zero_point``), or with ``offsets`` a float offset per scale
    instead, w = q * scale + offset (GGUF's Q4_1, Q5_1, Q4_K and Q5_K blocks, which
    compressed-tensors cannot hold): scales and offsets then lie in one float32 ``weight_table``
    [N, 2, G], the layout the kernels read, held once; with ``two_level`` (Q4_K, Q5_K, and
    without offsets Q6_K) a ``k_table`` of them in two levels as the blocks hold them; the
    kernels' integer products take such int8 values to be the K-quants' 5 or 6 bits (|q| <= 32,
    lanes of 8 products within int16). With ``levels`` an int4 weight's nibbles index
    ``IQ4_LEVELS``, w = level * scale (GGUF's IQ4_NL and IQ4_XS), which compressed-tensors
    cannot hold either: a checkpoint stores such weights as their int8 values
    (``saved_scheme``). ``held_bits`` 6 holds int8 values in [-32, 31] in 6 bits a value
    (``pack_six_bits``: GGUF's Q6_K), saved as int8 alike; 5 holds values in [-16, 15] in 5
    bits (``pack_five_bits``: GGUF's Q5_K, its offsets centred at 16 as int4's are at 8)."""
    name: str
    group_size: int | None = None
    symmetric: bool = True
    offsets: bool = False
    two_level: bool = False
    levels: bool = False
    held_bits: int | None = None

    @property
    def zero_points(self) -> bool:
        """Whether integer zero points come with the scales."""
        return not self.symmetric and not self.offsets

    @property
    def bits(self) -> int:
        return 4 if self.name == "int4" else 8

    @property
    def packed(self) -> bool:
        """True for the int formats (``weight_packed``), False for fp8 (``weight``)."""
        return self.name != "fp8"

    def tensor_names(self) -> tuple[str, ...]:
        if not self.packed:
            return ("weight", "weight_scale")
        names = ("weight_packed", "weight_shape", "weight_scale")
        if self.offsets or self.two_level:
            return ("weight_packed", "weight_shape", "weight_table")
        return (*names, "weight_zero_point") if self.zero_points else names


def make_scheme(name: str, group_size: int | None = None, symmetric: bool = True,
                offsets: bool = False, two_level: bool = False, levels: bool = False,
                held_bits: int | None = None) -> QuantScheme:
    """A checked scheme (ValueError naming what is wrong)."""
    if held_bits is not None and (name != "int8" or (held_bits, symmetric) not in
                                  ((6, True), (5, False))):
        raise ValueError(f"values held in fewer bits are int8's in 6 bits, symmetric (GGUF's "
                         f"Q6_K), or in 5 with offsets (Q5_K), not {name} in {held_bits}")
    if levels and (name != "int4" or not symmetric or group_size is None or
                   (two_level and group_size != K_GROUP)):
        raise ValueError(f"IQ4's levels index int4 nibbles in groups, symmetric (two-level "
                         f"scales in groups of {K_GROUP}), not {name} group {group_size}")
    k_quant = (name in ("int8", "int4") and group_size == K_GROUP and offsets) or \
        (name == "int8" and group_size == K6_GROUP and symmetric and not offsets) or levels
    if two_level and not k_quant:
        raise ValueError(f"two-level scales are GGUF's K-quants': Q4_K / Q5_K (int4 or int8 in "
                         f"groups of {K_GROUP} with offsets), Q6_K (int8 in groups of "
                         f"{K6_GROUP}, symmetric) or IQ4_XS (IQ4's levels), not {name} group "
                         f"{group_size}"
                         f"{' with offsets' if offsets else ''}")
    if name not in SCHEME_NAMES:
        raise ValueError(f"unknown quantization scheme {name!r}; expected one of "
                         f"{', '.join(SCHEME_NAMES)}")
    if group_size is not None and group_size <= 0:
        raise ValueError(f"group size must be positive, got {group_size}")
    if (offsets or not symmetric) and name == "fp8":
        raise ValueError("fp8 weights are symmetric (zero points are for int8 and int4)")
    if offsets and symmetric:
        raise ValueError("offsets make a scheme asymmetric: pass symmetric=False")
    return QuantScheme(name, group_size, symmetric, offsets, two_level, levels, held_bits)


def saved_scheme(scheme: QuantScheme) -> QuantScheme:
    """The scheme a checkpoint describes a weight held in ``scheme`` with: IQ4's levels and
    values held in fewer bits as int8 values (exact); a K table without offsets as its float32
    scales."""
    if scheme.levels:
        return QuantScheme("int8", scheme.group_size)
    scheme = scheme._replace(held_bits=None)
    return scheme._replace(two_level=False) if not scheme.offsets else scheme


# IQ4_NL's and IQ4_XS's 16 levels, which their 4-bit indices pick (llama.cpp's kvalues_iq4nl)
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


K_SUPER = 256  # inputs of a K-quant super-block: one d and dmin over its groups' sc and m
K_GROUP = 32  # inputs of a Q4_K / Q5_K group
K6_GROUP = 16  # inputs of a Q6_K group


def k_table_width(cols: int, group_size: int) -> int:
    """Bytes of one half of a K table's row: a float32 per super-block, a byte per group."""
    return 4 * (cols // K_SUPER) + cols // group_size


def k_table(d: torch.Tensor, sc: torch.Tensor, dmin: torch.Tensor | None = None,
            m: torch.Tensor | None = None) -> torch.Tensor:
    """A K table, uint8 [N, 2, 4 S + G]: per row [d float32 x S][sc byte x G], then [dmin x
    S][m x G] (the layout the kernels read: quant_rows.h). d, dmin [N, S] (float32 values of
    the blocks' float16), sc, m [N, G] integers in [0, 255] (or their bytes, uint8); without
    dmin and m (Q6_K) [N, 1, 4 S + G], its sc signed bytes in [-128, 127] (or their bytes)."""
    def half(top: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        byte = low if low.dtype == torch.uint8 else low.to(torch.int16).to(torch.uint8)
        return torch.cat([top.to(torch.float32).contiguous().view(torch.uint8), byte],
                         dim=1)  # (signed: two's complement)
    halves = [half(d, sc)] if dmin is None else [half(d, sc), half(dmin, m)]
    return torch.stack(halves, dim=1)


def k_centre(scheme: QuantScheme) -> float:
    """What a K table's offsets add back per scale: int4 stores a block's u as q = u - 8, int8
    stores u itself, int8 held in 5 bits q = u - 16."""
    return 8.0 if scheme.name == "int4" else 16.0 if scheme.held_bits == 5 else 0.0


def k_table_values(table: torch.Tensor, cols: int, scheme: QuantScheme
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A K table's float32 scales [N, G] (d * sc) and offsets (centre * scale - dmin * m, one
    rounding of exact products; None without offsets: Q6_K's)."""
    supers, groups = cols // K_SUPER, cols // scheme.group_size

    def level(half: torch.Tensor) -> torch.Tensor:  # d * sc per group, exact in float32
        top = half[:, :4 * supers].contiguous().view(torch.float32)
        low = half[:, 4 * supers:]
        low = low if scheme.offsets else low.contiguous().view(torch.int8)  # Q6_K's signed sc
        return top.repeat_interleave(groups // supers, dim=1) * low.float()
    scale = level(table[:, 0])
    if not scheme.offsets:
        return scale, None
    return scale, k_centre(scheme) * scale - level(table[:, 1])


def qmax(scheme: QuantScheme) -> float:
    """The value absmax maps to: 448 for fp8, half the int range (7.5, 127.5) for ints, as
    compressed-tensors' ``calculate_qparams`` has it (so +absmax clamps to 2^(b-1) - 1)."""
    return FP8_MAX if not scheme.packed else (2 ** scheme.bits - 1) / 2


def scale_shape(scheme: QuantScheme, out_features: int, in_features: int) -> tuple[int, int]:
    groups = 1 if scheme.group_size is None else in_features // scheme.group_size
    return out_features, groups


def zero_point_shape(scheme: QuantScheme, out_features: int, in_features: int
                     ) -> tuple[int, int]:
    """``weight_zero_point``'s packed shape: the [N, G] zero points packed down the columns."""
    return packed_width(out_features, scheme.bits), scale_shape(scheme, out_features,
                                                                in_features)[1]


def packed_width(in_features: int, bits: int) -> int:
    return math.ceil(in_features * bits / WORD_BITS)


def _grouped(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, K] viewed as [N, groups, K // groups]."""
    return weight.reshape(weight.shape[0], groups, weight.shape[1] // groups)


def compute_scale(weight: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """absmax / qmax per output channel or group (asymmetric: (max - min) / (2^bits - 1), the
    range widened to hold 0): [N, G] in the weight's dtype (float16 for other dtypes), zeros
    replaced by that dtype's eps."""
    n, k = weight.shape
    if scheme.group_size is not None and k % scheme.group_size:
        raise ValueError(f"group size {scheme.group_size} does not divide in_features {k}")
    groups = scale_shape(scheme, n, k)[1]
    dtype = weight.dtype if weight.dtype in SCALE_DTYPES else torch.float16
    grouped = _grouped(weight.float(), groups)
    if scheme.symmetric:
        scale = (grouped.abs().amax(dim=-1) / qmax(scheme)).to(dtype)
    else:
        spread = grouped.amax(dim=-1).clamp(min=0) - grouped.amin(dim=-1).clamp(max=0)
        scale = (spread / (2 ** scheme.bits - 1)).to(dtype)
    return torch.where(scale == 0, torch.finfo(dtype).eps, scale).to(dtype)


def compute_zero_point(weight: torch.Tensor, scale: torch.Tensor, scheme: QuantScheme
                       ) -> torch.Tensor:
    """The asymmetric zero points [N, G] (int8): the lowest int minus min / scale, rounded and
    clamped to the ints, the min taken over a range holding 0 (compressed-tensors' rule)."""
    n, k = weight.shape
    low = -(1 << (scheme.bits - 1))
    least = _grouped(weight.float(), scale.shape[1]).amin(dim=-1).clamp(max=0)
    return (low - least / scale.float()).round().clamp(low, -low - 1).to(torch.int8)


def _broadcast_scale(scale: torch.Tensor, n: int) -> torch.Tensor:
    """A [N, G], [N], [1] or scalar scale as float32 [N or 1, G]."""
    scale = scale.float()
    if scale.dim() == 2:
        return scale
    return scale.reshape(1, 1) if scale.numel() == 1 else scale.reshape(n, 1)


def quantize_values(weight: torch.Tensor, scale: torch.Tensor, scheme: QuantScheme,
                    zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """Round weight / scale (+ zero_point [N, G]) (float32) to the format: float8_e4m3fn, or
    int8 holding the int values (round to nearest even, clamped to [-2^(b-1), 2^(b-1) - 1])."""
    n, k = weight.shape
    scale = _broadcast_scale(scale, n)
    scaled = _grouped(weight.float(), scale.shape[1]) / scale.unsqueeze(-1)
    if zero_point is not None:
        scaled = scaled.round() + zero_point.float().unsqueeze(-1)
    scaled = scaled.reshape(n, k)
    if not scheme.packed:
        return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8)
    low = -(1 << (scheme.bits - 1))
    return scaled.clamp(low, -low - 1).round().to(torch.int8)


def quantize(weight: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
    """A dense weight [N, K] as the scheme's tensors (names as on disk)."""
    if weight.dim() != 2:
        raise ValueError(f"can only quantize a 2-D weight, got shape {tuple(weight.shape)}")
    weight = weight.detach()
    scale = compute_scale(weight, scheme)
    zero_point = None if scheme.symmetric else compute_zero_point(weight, scale, scheme)
    q = quantize_values(weight, scale, scheme, zero_point)
    if not scheme.packed:
        return {"weight": q, "weight_scale": scale}
    tensors = {"weight_packed": pack_ints(q, scheme.bits),
               "weight_shape": torch.tensor(weight.shape, dtype=torch.int64),
               "weight_scale": scale}
    if zero_point is not None:
        tensors["weight_zero_point"] = pack_zero_points(zero_point, scheme.bits)
    return tensors


def quantized_values(tensors: dict[str, torch.Tensor], scheme: QuantScheme) -> torch.Tensor:
    """The stored values as float32 [N, K] (fp8 widened, ints unpacked), before scaling."""
    if not scheme.packed:
        return tensors["weight"].float()
    k = int(tensors["weight_shape"][1])
    if scheme.levels:  # bytes of nibbles, each a level's index
        codes = unpack_ints(tensors["weight_packed"].view(torch.int32), 4, k).long() + 8
        return torch.tensor(IQ4_LEVELS, dtype=torch.float32)[codes]
    if scheme.held_bits:
        unpack = unpack_six_bits if scheme.held_bits == 6 else unpack_five_bits
        return unpack(tensors["weight_packed"], k).float()
    return unpack_ints(tensors["weight_packed"], scheme.bits, k).float()


def dequantize(tensors: dict[str, torch.Tensor], scheme: QuantScheme,
               dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [N, K] in ``dtype``: (q - zp) * scale, computed in float32 (exact for
    these formats), rounded once to ``dtype``."""
    values = quantized_values(tensors, scheme)
    n, k = values.shape
    offset = None
    if scheme.two_level:
        scale, offset = k_table_values(tensors["weight_table"], k, scheme)
    elif scheme.offsets:
        scale, offset = tensors["weight_table"].float().unbind(1)
    else:
        scale = _broadcast_scale(tensors["weight_scale"], n)
    grouped = _grouped(values, scale.shape[1])
    if offset is not None:  # q * scale exact in float32 (at most 24 bits), one rounding of the sum
        return (grouped * scale.unsqueeze(-1) + offset.unsqueeze(-1)).reshape(n, k).to(dtype)
    if scheme.zero_points:
        zero_point = unpack_zero_points(tensors["weight_zero_point"], scheme.bits, n)
        grouped = grouped - zero_point.float().unsqueeze(-1)
    return (grouped * scale.unsqueeze(-1)).reshape(n, k).to(dtype)


def kernel_scales(tensors: dict[str, torch.Tensor], scheme: QuantScheme) -> torch.Tensor:
    """An asymmetric weight's scales and offsets as the kernels read them: float32 [N, 2, G],
    a row's G scales, then its G offsets (-zp * scale, or as held: ``weight_table`` itself),
    so that w = q * scale + offset (for zero points exact in float32 for bf16 and float16
    scales: q * scale, zp * scale and their difference all are float32 values)."""
    if scheme.offsets:
        return tensors["weight_table"].float().contiguous()
    n = int(tensors["weight_shape"][0])
    scale = _broadcast_scale(tensors["weight_scale"], n).expand(n, -1)
    offset = -unpack_zero_points(tensors["weight_zero_point"], scheme.bits, n).float() * scale
    return torch.stack([scale, offset], dim=1).contiguous()


ACTIVATION_BLOCK = 32  # inputs per scale when activations are quantized to int8


def int8_activations(x: torch.Tensor, block: int = ACTIVATION_BLOCK) -> torch.Tensor:
    """x [..., K] as the native int8 / int4 decode kernels see it (float32): each block of
    ``block`` inputs quantized to int8 with scale max |x| / 127, rounded half to even, and
    scaled back (llama.cpp's Q8_0 activations). K must be a multiple of ``block``."""
    values = x.float().reshape(*x.shape[:-1], -1, block)
    scale = values.abs().amax(-1, keepdim=True) / 127.0
    q = torch.where(scale > 0, values / scale, torch.zeros_like(values)).round()
    return (q * scale).reshape(x.shape)


def pack_ints(q: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 values [N, K] in [-2^(b-1), 2^(b-1)) packed into int32 [N, ceil(K * b / 32)]:
    element j stored as q + 2^(b-1) at bit (j % (32 // b)) * b of word j // (32 // b)."""
    if WORD_BITS % bits:
        raise ValueError(f"packing supports bit widths dividing 32, got {bits}")
    if bits in (4, 8) and sys.byteorder == "little":
        return _pack_bytes(q, bits)
    per_word = WORD_BITS // bits
    n, k = q.shape
    unsigned = (q.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
    unsigned = torch.nn.functional.pad(unsigned, (0, -k % per_word))
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (unsigned.reshape(n, -1, per_word) << shifts).sum(dim=-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _pack_bytes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """``pack_ints`` for 8 and 4 bits on a little-endian host, in bytes: the words' bytes are
    the values (q + 128), or pairs of them (q + 8, the first in the low nibble), in order, so
    the packed rows are those bytes viewed as int32 (loading a Q4_K_M file of
    granite-4.0-h-tiny's shape spent 77 s packing with int64 sums, ~3 s so)."""
    n, k = q.shape
    # q + 2^(b-1) in b bits is q's two's-complement byte with bit b-1 flipped, low b bits kept
    unsigned = q.to(torch.int8).view(torch.uint8) ^ (1 << (bits - 1))
    if bits == 4:
        unsigned = torch.nn.functional.pad(unsigned, (0, k % 2))
        unsigned = (unsigned[:, 0::2] & 0x0F) | (unsigned[:, 1::2] << 4)
    unsigned = torch.nn.functional.pad(unsigned, (0, -unsigned.shape[1] % 4))
    return unsigned.contiguous().reshape(-1).view(torch.int32).reshape(n, unsigned.shape[1] // 4)


SIX_BIT_BLOCK = 128  # inputs of one run of int6 bytes: 64 of low nibbles, 32 of high pairs


def pack_six_bits(q: torch.Tensor) -> torch.Tensor:
    """int8 values [N, K] in [-32, 31] (K a multiple of 128) as uint8 [N, 3K / 4], u = q + 32
    in 96 bytes per 128 inputs: 64 bytes of low nibbles (byte i: input i, and input i + 64 in
    its high nibble), then 32 of high bit pairs (byte l: inputs l, l + 32, l + 64, l + 96 in
    bits 0-1, 2-3, 4-5, 6-7); GGUF's Q6_K blocks hold their halves so."""
    n, k = q.shape
    u = (q.to(torch.int16) + 32).to(torch.uint8).reshape(n, k // SIX_BIT_BLOCK, SIX_BIT_BLOCK)
    low = (u[..., :64] & 15) | ((u[..., 64:] & 15) << 4)
    pairs = (u >> 4).reshape(n, k // SIX_BIT_BLOCK, 4, 32)  # [.., quarter, l]
    high = pairs[..., 0, :] | (pairs[..., 1, :] << 2) | (pairs[..., 2, :] << 4) | \
        (pairs[..., 3, :] << 6)
    return torch.cat([low, high], dim=-1).reshape(n, k // 4 * 3)


def unpack_six_bits(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of ``pack_six_bits``: int8 [N, k]."""
    n = packed.shape[0]
    runs = packed.reshape(n, k // SIX_BIT_BLOCK, 96)
    low, high = runs[..., :64], runs[..., 64:]
    nibbles = torch.cat([low & 15, low >> 4], dim=-1)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(4, 1)
    pairs = (high.unsqueeze(-2) >> shifts) & 3  # [.., quarter, l]
    u = nibbles | (pairs.reshape(n, k // SIX_BIT_BLOCK, SIX_BIT_BLOCK) << 4)
    return (u.to(torch.int16) - 32).to(torch.int8).reshape(n, k)


FIVE_BIT_BLOCK = 256  # inputs of one run of int5 bytes: 128 of nibbles, 32 of fifth bits


def pack_five_bits(q: torch.Tensor) -> torch.Tensor:
    """int8 values [N, K] in [-16, 15] (K a multiple of 256) as uint8 [N, 5K / 8], u = q + 16
    in 160 bytes per 256 inputs, as GGUF's Q5_K blocks hold them: 128 bytes of nibbles (byte
    32c + l: input 64c + l, and 64c + 32 + l in its high nibble), then 32 of fifth bits (byte
    l, bit j: input 32j + l)."""
    n, k = q.shape
    u = (q.to(torch.int16) + 16).to(torch.uint8).reshape(n, k // FIVE_BIT_BLOCK, 4, 2, 32)
    low = ((u[..., 0, :] & 15) | ((u[..., 1, :] & 15) << 4)).reshape(n, k // FIVE_BIT_BLOCK, 128)
    fifth = (u.reshape(n, k // FIVE_BIT_BLOCK, 8, 32) >> 4) & 1  # [.., j, l]
    weights = (1 << torch.arange(8, dtype=torch.int16)).view(8, 1)
    high = (fifth.to(torch.int16) * weights).sum(dim=-2).to(torch.uint8)
    return torch.cat([low, high], dim=-1).reshape(n, k // 8 * 5)


def unpack_five_bits(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of ``pack_five_bits``: int8 [N, k]."""
    n = packed.shape[0]
    runs = packed.reshape(n, k // FIVE_BIT_BLOCK, 160)
    low = runs[..., :128].reshape(n, k // FIVE_BIT_BLOCK, 4, 1, 32)
    nibbles = torch.cat([low & 15, low >> 4], dim=-2).reshape(n, k // FIVE_BIT_BLOCK, 8, 32)
    shifts = torch.arange(8, dtype=torch.uint8).view(8, 1)
    fifth = (runs[..., 128:].unsqueeze(-2) >> shifts) & 1  # [.., j, l]
    u = nibbles | (fifth << 4)
    return (u.to(torch.int16) - 16).to(torch.int8).reshape(n, k)


def pack_zero_points(zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points [N, G] (int8) packed down the columns: int32 [ceil(N * bits / 32), G]."""
    return pack_ints(zero_point.t(), bits).t().contiguous()


def unpack_zero_points(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of ``pack_zero_points``: int8 [n, G]."""
    return unpack_ints(packed.t().contiguous(), bits, n).t()


def unpack_ints(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """The inverse of ``pack_ints``: int8 [N, k]."""
    if WORD_BITS % bits:
        raise ValueError(f"packing supports bit widths dividing 32, got {bits}")
    per_word = WORD_BITS // bits
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    fields = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    values = fields.reshape(packed.shape[0], -1)[:, :k] - (1 << (bits - 1))
    return values.to(torch.int8)
