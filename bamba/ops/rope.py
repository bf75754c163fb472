"""Rotary position embedding, NeoX "rotate half" style, optionally on part of each head, with
the scalings transformers reads from a config's ``rope_parameters`` (``modeling_rope_utils``):
linear, dynamic NTK, YaRN, LongRoPE and Llama 3.

A scaling is the config's dict as written (``rope_type`` or the legacy ``type``, plus its
fields); ``RopeSpec`` bundles it with the sizes the angles need. Dynamic NTK and LongRoPE
depend on the length of the sequence a token belongs to (``lengths``): transformers takes the
largest position of the call plus one, and so does ``rope_cos_sin`` by default, per row.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
LENGTH_DEPENDENT = ("dynamic", "longrope")  # frequencies change with the sequence's length
_REQUIRED = {"default": (), "linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
             "longrope": ("short_factor", "long_factor"),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor")}
_OPTIONAL = {"default": (), "linear": (), "dynamic": (),
             "yarn": ("original_max_position_embeddings", "attention_factor", "beta_fast",
                      "beta_slow", "mscale", "mscale_all_dim", "truncate"),
             "longrope": ("original_max_position_embeddings", "attention_factor", "factor"),
             "llama3": ("original_max_position_embeddings",)}
_SHARED = ("rope_type", "type", "rope_theta", "partial_rotary_factor")


@dataclass(frozen=True)
class RopeSpec:
    """What the rotary angles of a model depend on: the rotated width, the base, the
    configured context and the scaling dict (None: plain RoPE)."""

    rotary_dim: int
    theta: float
    max_position_embeddings: int
    scaling: Mapping[str, Any] | None = None

    @property
    def rope_type(self) -> str:
        return rope_type_of(self.scaling)

    @property
    def length_dependent(self) -> bool:
        """Whether a token's frequencies depend on its sequence's length (dynamic, longrope)."""
        return self.rope_type in LENGTH_DEPENDENT

    @property
    def original_length(self) -> int:
        """The pre-scaling context: ``original_max_position_embeddings``, else the configured one."""
        value = (self.scaling or {}).get("original_max_position_embeddings")
        return self.max_position_embeddings if value is None else int(value)

    @property
    def context_length(self) -> int:
        """The longest sequence the model allows: factor × the original context for a scaling
        (never less than ``max_position_embeddings``), ``max_position_embeddings`` without."""
        factor = (self.scaling or {}).get("factor")
        if self.rope_type == "default" or factor is None:
            return self.max_position_embeddings
        return max(self.max_position_embeddings, int(factor * self.original_length))


def rope_type_of(scaling: Mapping[str, Any] | None) -> str:
    """The scaling's ``rope_type`` (``type`` in older configs); "default" when there is none."""
    if not scaling:
        return "default"
    return scaling.get("rope_type") or scaling.get("type") or "default"


def check_rope_scaling(scaling: Mapping[str, Any], rotary_dim: int) -> None:
    """ValueError naming the first problem of a scaling dict: unknown type, a missing field, a
    factor below 1, a factor list of the wrong length. Unknown fields are logged, as
    transformers does."""
    kind = rope_type_of(scaling)
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling: unknown rope_type {kind!r}; known: {', '.join(ROPE_TYPES)}")
    missing = [k for k in _REQUIRED[kind] if scaling.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling: rope_type {kind!r} needs {', '.join(missing)}")
    unknown = set(scaling) - set(_REQUIRED[kind]) - set(_OPTIONAL[kind]) - set(_SHARED)
    if unknown:
        log.warning("rope_scaling: fields %s are not used by rope_type %r", sorted(unknown), kind)
    for name in ("factor", "low_freq_factor", "high_freq_factor", "attention_factor", "beta_fast",
                 "beta_slow", "mscale", "mscale_all_dim"):
        value = scaling.get(name)
        if value is not None and not _is_number(value):
            raise ValueError(f"rope_scaling: {name} must be a number, got {value!r}")
    if scaling.get("factor") is not None and not scaling["factor"] >= 1:
        raise ValueError(f"rope_scaling: factor must be >= 1, got {scaling['factor']!r}")
    if scaling.get("attention_factor") is not None and not scaling["attention_factor"] > 0:
        raise ValueError(f"rope_scaling: attention_factor must be > 0, got "
                         f"{scaling['attention_factor']!r}")
    original = scaling.get("original_max_position_embeddings")
    if original is not None and (not isinstance(original, int) or isinstance(original, bool)
                                 or original <= 0):
        raise ValueError(f"rope_scaling: original_max_position_embeddings must be a positive "
                         f"integer, got {original!r}")
    if kind == "longrope":
        for name in ("short_factor", "long_factor"):
            values = scaling[name]
            if not isinstance(values, (list, tuple)) or len(values) != rotary_dim // 2 or \
                    not all(_is_number(v) and v > 0 for v in values):
                raise ValueError(f"rope_scaling: {name} must be a list of {rotary_dim // 2} "
                                 f"positive numbers (rotary width {rotary_dim} / 2), got "
                                 f"{_brief(values)}")
    if kind == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ValueError(f"rope_scaling: high_freq_factor ({scaling['high_freq_factor']}) must "
                         f"exceed low_freq_factor ({scaling['low_freq_factor']})")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _exponents(rotary_dim: int, device: torch.device | None) -> torch.Tensor:
    """2i / d for the d/2 frequency pairs, float32."""
    return torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float() / rotary_dim


def inv_freq_and_factor(spec: RopeSpec, seq_len: int | None = None,
                        device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rotary_dim / 2] (float32) and the factor cos and sin are scaled by,
    for a sequence of ``seq_len`` tokens (None: the configured context), as transformers'
    ``ROPE_INIT_FUNCTIONS[rope_type]`` computes them."""
    kind, s = spec.rope_type, spec.scaling or {}
    base, dim = spec.theta, spec.rotary_dim
    if kind == "dynamic":
        length = torch.tensor([spec.max_position_embeddings if seq_len is None else seq_len],
                              device=device)
        return _dynamic_inv_freq(spec, length)[0], 1.0
    if kind == "longrope":
        return _longrope_inv_freq(spec, seq_len is not None and seq_len > spec.original_length,
                                  device), longrope_attention_factor(spec)
    inv_freq = 1.0 / (base ** _exponents(dim, device))
    if kind == "linear":
        return inv_freq / s["factor"], 1.0
    if kind == "yarn":
        return _yarn_inv_freq(spec, device), yarn_attention_factor(spec)
    if kind == "llama3":
        return _llama3_inv_freq(spec, inv_freq), 1.0
    return inv_freq, 1.0


def _dynamic_inv_freq(spec: RopeSpec, lengths: torch.Tensor) -> torch.Tensor:
    """Dynamic NTK: the base grows with each length beyond the configured context.
    lengths [...] (int64) -> inv_freq [..., rotary_dim / 2], float32 as transformers."""
    factor, dim, context = spec.scaling["factor"], spec.rotary_dim, spec.max_position_embeddings
    lengths = torch.clamp(lengths, min=context)
    base = spec.theta * ((factor * lengths / context) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base[..., None] ** _exponents(dim, lengths.device))


def _longrope_inv_freq(spec: RopeSpec, long: bool, device: torch.device | None) -> torch.Tensor:
    ext = torch.tensor(spec.scaling["long_factor" if long else "short_factor"],
                       dtype=torch.float32, device=device)
    return 1.0 / (ext * spec.theta ** _exponents(spec.rotary_dim, device))


def longrope_attention_factor(spec: RopeSpec) -> float:
    """Given, else sqrt(1 + ln(factor) / ln(original context)) (1 when factor <= 1)."""
    s = spec.scaling
    if s.get("attention_factor") is not None:
        return s["attention_factor"]
    factor = s.get("factor")
    if factor is None:
        factor = spec.max_position_embeddings / spec.original_length
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(spec.original_length))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(spec: RopeSpec) -> float:
    """Given, else the YaRN paper's 0.1 ln(factor) + 1 (with mscale / mscale_all_dim: their ratio)."""
    s, factor = spec.scaling, spec.scaling["factor"]
    if s.get("attention_factor") is not None:
        return s["attention_factor"]
    if s.get("mscale") and s.get("mscale_all_dim"):
        return float(_yarn_mscale(factor, s["mscale"]) / _yarn_mscale(factor, s["mscale_all_dim"]))
    return _yarn_mscale(factor)


def _yarn_inv_freq(spec: RopeSpec, device: torch.device | None) -> torch.Tensor:
    """Interpolated (÷ factor) below the correction range, extrapolated above it, a linear ramp
    between; the range is where a dimension turns beta_fast .. beta_slow times in the original
    context."""
    s, base, dim, factor = spec.scaling, spec.theta, spec.rotary_dim, spec.scaling["factor"]
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(spec.original_length / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a ramp of one point
    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp.to(device)
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def _llama3_inv_freq(spec: RopeSpec, inv_freq: torch.Tensor) -> torch.Tensor:
    """Long wavelengths ÷ factor, short ones kept, a smooth blend between."""
    s = spec.scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    context = spec.original_length
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < context / high) * ~(wavelen > context / low)
    return torch.where(medium, smoothed, scaled)


def default_lengths(positions: torch.Tensor) -> torch.Tensor:
    """Each token's sequence length as transformers' forward sees it: its row's largest
    position + 1. positions [B, L] -> [B, L]."""
    return (positions.amax(dim=-1, keepdim=True) + 1).expand_as(positions)


def rope_cos_sin(positions: torch.Tensor, spec: RopeSpec, dtype: torch.dtype,
                 lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for integer positions [B, L] -> two [B, L, rotary_dim] tensors, scaled by the
    attention factor. ``lengths`` [B, L]: the sequence length each token's dynamic NTK or
    LongRoPE frequencies are chosen for (default ``default_lengths``); other types ignore it.

    Angles are computed in float32 (bf16 positions would lose integers past 256) and cast once.
    """
    device = positions.device
    if spec.length_dependent:
        lengths = default_lengths(positions) if lengths is None else lengths
        if spec.rope_type == "dynamic":
            inv_freq, factor = _dynamic_inv_freq(spec, lengths), 1.0  # [B, L, R/2]
        else:
            long = (lengths > spec.original_length)[..., None]
            inv_freq = torch.where(long, _longrope_inv_freq(spec, True, device),
                                   _longrope_inv_freq(spec, False, device))
            factor = longrope_attention_factor(spec)
    else:
        inv_freq, factor = _fixed_inv_freq(spec, device)
    freqs = positions.float()[..., None] * inv_freq  # [B, L, R/2]
    angles = torch.cat((freqs, freqs), dim=-1)  # [B, L, R]
    cos, sin = angles.cos(), angles.sin()
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos.to(dtype), sin.to(dtype)


_FIXED_INV_FREQ: dict[tuple, tuple[torch.Tensor, float]] = {}


def _fixed_inv_freq(spec: RopeSpec, device: torch.device) -> tuple[torch.Tensor, float]:
    """``inv_freq_and_factor`` for a length-independent spec, computed once per spec and
    device (a decode step would otherwise spend ~40 us on it: a handful of small torch ops).
    Traced afresh under torch.compile, which folds it into the graph."""
    if torch.compiler.is_compiling():
        return inv_freq_and_factor(spec, device=device)
    key = (spec.rotary_dim, spec.theta, spec.max_position_embeddings, _frozen(spec.scaling),
           device)
    found = _FIXED_INV_FREQ.get(key)
    if found is None:
        with torch.inference_mode(False):  # a plain tensor: usable under autograd later
            found = _FIXED_INV_FREQ[key] = inv_freq_and_factor(spec, device=device)
    return found


def _frozen(value: Any) -> Any:
    """A scaling dict (values: numbers, strings, lists) as a hashable key."""
    if isinstance(value, Mapping):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(map(_frozen, value))
    return value


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] channels of every head. x: [B, L, H, D]; cos, sin: [B, L, R]."""
    rotary_dim = cos.shape[-1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)
