"""One configuration object for the hybrid Mamba2/attention family.

Field names are those of transformers' ``BambaConfig`` so a ``config.json`` published for
transformers reads here unchanged. The same object describes a pure Mamba2 model
(``attn_layer_indices=[]``), an all-attention Llama-style twin (``model_type="llama"``) and
IBM's dense Granite 4.0 hybrids (``model_type="granitemoehybrid"``: Bamba's layers with
multipliers on the embeddings, residual branches, attention scores and logits, and attention
without RoPE unless ``position_embedding_type`` is "rope").
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bamba.files import read_json_object
from bamba.ops.rope import RopeSpec, check_rope_scaling, rope_type_of

MODEL_TYPES = ("bamba", "llama", "granitemoehybrid")
GRANITE = "granitemoehybrid"
POSITION_EMBEDDINGS = ("rope", "nope")
# transformers' layer type names, old and new, for Granite's layer_types
_GRANITE_LAYER_TYPES = {"mamba": "mamba", "linear_attention": "mamba",
                        "attention": "attention", "full_attention": "attention"}


@dataclass
class BambaConfig:
    """Architecture of one model; derived sizes are properties, validation raises ValueError."""

    vocab_size: int = 128000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None
    attn_layer_indices: list[int] = field(default_factory=list)
    mamba_n_heads: int = 128
    mamba_d_head: int | str = "auto"
    mamba_n_groups: int = 1
    mamba_d_state: int = 256
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    # transformers' rope_parameters without rope_theta and partial_rotary_factor: the scaling
    # (rope_type and its fields, bamba.ops.rope), None for plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 262144
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0
    z_loss_coefficient: float = 0.0
    initializer_range: float = 0.02
    # Granite 4.0's multipliers (1.0 elsewhere): embeddings x embedding_multiplier, each
    # residual branch x residual_multiplier, attention scores x attention_multiplier (None:
    # head_dim ** -0.5), logits / logits_scaling; "nope": attention without rotary positions.
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
    position_embedding_type: str = "rope"
    # Granite's mixture of experts beside the (shared) MLP: 0 experts for a dense model
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    expert_intermediate_size: int = 0
    model_type: str = "bamba"

    def __post_init__(self) -> None:
        check_field_types(self, "config field ")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not one of {MODEL_TYPES}")
        if self.model_type == "llama":
            # A Llama checkpoint is the all-attention member of the family with full-width RoPE.
            self.attn_layer_indices = list(range(self.num_hidden_layers))
        self.attn_layer_indices = sorted(int(i) for i in self.attn_layer_indices)
        self.time_step_limit = (float(self.time_step_limit[0]), float(self.time_step_limit[1]))
        if not self.num_local_experts:  # a dense model: the experts' sizes mean nothing
            self.num_experts_per_tok = self.expert_intermediate_size = 0
        self._check_positive(("num_attention_heads", "mamba_n_heads"))  # divisors just below
        if self.mamba_d_head == "auto":
            self.mamba_d_head = self.mamba_expand * self.hidden_size // self.mamba_n_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rope_scaling is not None:
            scaling = {k: v for k, v in self.rope_scaling.items()
                       if k not in ("rope_theta", "partial_rotary_factor")}
            kind = rope_type_of(scaling)  # the legacy "type" stays, rope_type joins it
            self.rope_scaling = None if kind == "default" else {"rope_type": kind, **scaling}
        self.validate()

    def _check_positive(self, names: tuple[str, ...]) -> None:
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config field {name} must be a positive integer, got {value!r}")

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "mamba_n_heads",
                    "mamba_d_head", "mamba_n_groups", "mamba_d_state", "mamba_d_conv",
                    "mamba_expand", "mamba_chunk_size", "max_position_embeddings")
        self._check_positive(positive)
        bad = [i for i in self.attn_layer_indices if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"attn_layer_indices {bad} outside 0..{self.num_hidden_layers - 1}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_key_value_heads must divide num_attention_heads")
        if self.mamba_d_head * self.mamba_n_heads != self.d_inner:
            raise ValueError(
                f"mamba_n_heads * mamba_d_head ({self.mamba_n_heads} * {self.mamba_d_head}) "
                f"must equal mamba_expand * hidden_size ({self.d_inner})")
        if self.mamba_n_heads % self.mamba_n_groups:
            raise ValueError("mamba_n_groups must divide mamba_n_heads")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(f"partial_rotary_factor {self.partial_rotary_factor} gives an odd "
                             f"or empty rotary width for head_dim {self.head_dim}")
        for name in ("rms_norm_eps", "rope_theta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"config field {name} must be > 0, got {getattr(self, name)!r}")
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling, self.rotary_dim)
        for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
            if not getattr(self, name) > 0:
                raise ValueError(f"config field {name} must be > 0, got {getattr(self, name)!r}")
        if self.attention_multiplier is not None and not self.attention_multiplier > 0:
            raise ValueError(f"config field attention_multiplier must be > 0, got "
                             f"{self.attention_multiplier!r}")
        if self.num_local_experts < 0 or (self.num_local_experts and not (
                0 < self.num_experts_per_tok <= self.num_local_experts and
                self.expert_intermediate_size > 0)):
            raise ValueError(f"num_local_experts {self.num_local_experts} needs "
                             f"num_experts_per_tok in 1..{self.num_local_experts} and a positive "
                             f"expert_intermediate_size, got {self.num_experts_per_tok} and "
                             f"{self.expert_intermediate_size}")
        if self.num_local_experts and self.model_type != GRANITE:
            raise ValueError(f"experts are Granite's ({GRANITE}), not {self.model_type}'s")
        if self.position_embedding_type not in POSITION_EMBEDDINGS:
            raise ValueError(f"position_embedding_type {self.position_embedding_type!r} is not "
                             f"one of {POSITION_EMBEDDINGS}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        low, high = self.time_step_limit
        if not 0.0 <= low <= high:
            raise ValueError(f"time_step_limit {self.time_step_limit} must satisfy 0 <= low <= high")

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def d_inner(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def conv_dim(self) -> int:
        """Channels through the depthwise conv: x, B and C together."""
        return self.d_inner + 2 * self.mamba_n_groups * self.mamba_d_state

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def uses_rope(self) -> bool:
        """Whether attention layers rotate queries and keys (Granite's "nope" does not)."""
        return self.position_embedding_type == "rope" and bool(self.attn_layer_indices)

    @property
    def attention_scale(self) -> float:
        """The factor on attention scores: attention_multiplier, else head_dim ** -0.5."""
        return self.head_dim ** -0.5 if self.attention_multiplier is None \
            else self.attention_multiplier

    @property
    def rope_spec(self) -> RopeSpec:
        return RopeSpec(self.rotary_dim, self.rope_theta, self.max_position_embeddings,
                        self.rope_scaling)

    @property
    def context_length(self) -> int:
        """The longest sequence the model allows: ``max_position_embeddings``, or what its RoPE
        scaling extends the original context to (``RopeSpec.context_length``)."""
        return self.rope_spec.context_length

    @property
    def layer_types(self) -> list[str]:
        attn = set(self.attn_layer_indices)
        return ["attention" if i in attn else "mamba" for i in range(self.num_hidden_layers)]

    @property
    def mamba_layer_indices(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "mamba"]

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    # ---- Hugging Face config.json ------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "BambaConfig":
        """Build from a transformers config.json dict (Bamba or Llama); unknown keys are ignored."""
        model_type = raw.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported (expected one of {MODEL_TYPES})")
        if model_type == GRANITE:
            raw = _granite_fields(raw)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known}
        # transformers prefers the legacy rope_scaling when both are present.
        rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"rope_parameters must be a mapping, got {rope!r}")
        kwargs["rope_scaling"] = rope or None
        kwargs["rope_theta"] = _as_float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
        # transformers hard-codes 0.5 for Bamba; Llama rotates the whole head.
        default_factor = 0.5 if model_type == "bamba" else 1.0
        kwargs["partial_rotary_factor"] = _as_float(rope.get("partial_rotary_factor", default_factor))
        if model_type == "llama":  # no Mamba layers: keep the unused Mamba sizes consistent
            d_inner = kwargs.get("mamba_expand", 2) * kwargs.get("hidden_size", 4096)
            kwargs.setdefault("mamba_d_head", math.gcd(d_inner, 64))
            kwargs.setdefault("mamba_n_heads", d_inner // kwargs["mamba_d_head"])
        if model_type != "llama" and kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = raw.get("num_attention_heads", 32)
        if isinstance(kwargs.get("time_step_limit"), list):  # else left for the type check
            kwargs["time_step_limit"] = tuple(_decode_float(v) for v in kwargs["time_step_limit"])
        for key in ("attn_layer_indices",):
            if kwargs.get(key) is None:
                kwargs.pop(key, None)
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json transformers reads for this architecture."""
        rope = {"rope_type": self.rope_spec.rope_type, **(self.rope_scaling or {}),
                "rope_theta": self.rope_theta}
        common = {
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "hidden_act": self.hidden_act,
            "rms_norm_eps": self.rms_norm_eps, "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": self.attention_bias, "mlp_bias": self.mlp_bias,
            "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
            "initializer_range": self.initializer_range, "model_type": self.model_type,
        }
        if self.model_type == "llama":
            return {**common, "architectures": ["LlamaForCausalLM"], "head_dim": self.head_dim,
                    "rope_parameters": {**rope, "partial_rotary_factor": self.partial_rotary_factor}
                    if self.partial_rotary_factor != 1.0 else rope}
        mamba = {
            "mamba_n_heads": self.mamba_n_heads, "mamba_d_head": self.mamba_d_head,
            "mamba_n_groups": self.mamba_n_groups, "mamba_d_state": self.mamba_d_state,
            "mamba_d_conv": self.mamba_d_conv, "mamba_expand": self.mamba_expand,
            "mamba_chunk_size": self.mamba_chunk_size, "mamba_conv_bias": self.mamba_conv_bias,
            "mamba_proj_bias": self.mamba_proj_bias,
            "time_step_limit": [_encode_float(v) for v in self.time_step_limit],
            "rope_parameters": {**rope, "partial_rotary_factor": self.partial_rotary_factor},
        }
        if self.model_type == GRANITE:
            return {
                **common, **mamba, "architectures": ["GraniteMoeHybridForCausalLM"],
                "layer_types": self.layer_types, "shared_intermediate_size": self.intermediate_size,
                "num_local_experts": self.num_local_experts,
                "num_experts_per_tok": self.num_experts_per_tok,
                "intermediate_size": self.expert_intermediate_size or self.intermediate_size,
                "embedding_multiplier": self.embedding_multiplier,
                "residual_multiplier": self.residual_multiplier,
                "attention_multiplier": self.attention_scale,
                "logits_scaling": self.logits_scaling,
                "position_embedding_type": "rope" if self.position_embedding_type == "rope"
                else None}
        return {**common, **mamba, "architectures": ["BambaForCausalLM"],
                "attn_layer_indices": self.attn_layer_indices,
                "z_loss_coefficient": self.z_loss_coefficient}

    @classmethod
    def from_json_file(cls, path: str | Path) -> "BambaConfig":
        raw = read_json_object(Path(path))
        try:
            return cls.from_hf_dict(raw)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None

    def replace(self, **changes: Any) -> "BambaConfig":
        return dataclasses.replace(self, **changes)


def _granite_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """A GraniteMoeHybrid config.json in our fields: layer_types as attention indices, the
    shared MLP's width as intermediate_size (an expert's as expert_intermediate_size),
    transformers' defaults where a field is absent."""
    experts = raw.get("num_local_experts", 8)
    kinds = raw.get("layer_types", raw.get("layers_block_type"))
    if not isinstance(kinds, list) or any(k not in _GRANITE_LAYER_TYPES for k in kinds):
        raise ValueError(f"layer_types must list 'mamba' or 'attention' per layer, got {kinds!r}")
    position = raw.get("position_embedding_type")
    if position not in (None, "nope", "rope"):
        raise ValueError(f"position_embedding_type {position!r} is not one of None, 'nope', "
                         f"'rope'")
    if len(kinds) != raw.get("num_hidden_layers", len(kinds)):
        raise ValueError(f"layer_types has {len(kinds)} entries for num_hidden_layers "
                         f"{raw['num_hidden_layers']}")
    return {"vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
            "num_experts_per_tok": 2,
            "intermediate_size": raw.get("shared_intermediate_size", 1024),
            "expert_intermediate_size": raw.get("intermediate_size", 11008) if experts else 0,
            "num_local_experts": experts,
            "attention_multiplier": 1.0, "pad_token_id": None,
            **{k: v for k, v in raw.items() if k not in ("intermediate_size",
                                                          "attn_layer_indices")},
            "attn_layer_indices": [i for i, k in enumerate(kinds)
                                   if _GRANITE_LAYER_TYPES[k] == "attention"],
            "num_hidden_layers": raw.get("num_hidden_layers", len(kinds)),
            "position_embedding_type": "rope" if position == "rope" else "nope"}


def _decode_float(value: Any) -> Any:
    """transformers writes infinity as {"__float__": "Infinity"}; older files use a bare number
    (anything else is returned as it is, for the type check to name)."""
    if isinstance(value, dict) and value.get("__float__") in ("Infinity", "-Infinity", "NaN"):
        return float(value["__float__"])
    return value


# ---- field types: one check for every dataclass config of the package ------------------------
def check_field_types(obj: Any, prefix: str = "", infinite: tuple[str, ...] = ("time_step_limit",),
                      ) -> None:
    """ValueError naming the first field of dataclass ``obj`` whose value does not match its
    annotation, or a float field (other than those in ``infinite``) that is NaN or infinite."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not matches_type(value, hints[f.name]):
            raise ValueError(f"{prefix}{f.name} must be {type_name(hints[f.name])}, got {value!r}")
        numbers = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers) \
                and (f.name not in infinite or any(v != v for v in numbers)):
            raise ValueError(f"{prefix}{f.name} must be a finite number, got {value!r}")


def matches_type(value: Any, hint: Any) -> bool:
    """``isinstance`` for the annotations configs use (unions, lists, fixed tuples, dicts);
    an int is a float, a bool is neither, a list or tuple is either."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches_type(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(matches_type, value, args))
        return not args or all(matches_type(v, args[0]) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return hint is Any or isinstance(value, hint)


def type_name(hint: Any) -> str:
    """How an annotation reads in an error message ("int or null", "a list of int")."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if hint is type(None):
        return "null"
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"a list of {len(args)} {type_name(args[0])}"
    if origin in (list, tuple) and args:
        return f"a list of {type_name(args[0])}"
    if origin is dict:
        return "a mapping"
    return getattr(origin or hint, "__name__", str(hint))


def _as_float(value: Any) -> Any:
    """A number as a float; anything else unchanged (for the type check to name)."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if is_number else value


def _encode_float(value: float) -> Any:
    return {"__float__": "Infinity"} if math.isinf(value) else value


def with_rope_scaling(config: BambaConfig, scaling: dict[str, Any] | None) -> BambaConfig:
    """``config`` with its RoPE scaling replaced by ``scaling`` (a ``rope_parameters`` dict;
    its rope_theta and partial_rotary_factor, when given, replace the config's too); None
    keeps the config's. ValueError names what is wrong with it."""
    if scaling is None:
        return config
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be a JSON object, got {scaling!r}")
    if config.position_embedding_type == "nope":
        raise ValueError("rope_scaling does not apply: this model's attention has no rotary "
                         "positions (position_embedding_type null)")
    changes = {k: _as_float(scaling[k]) for k in ("rope_theta", "partial_rotary_factor")
               if k in scaling}
    return config.replace(rope_scaling=scaling, **changes)


def context_hint(config: BambaConfig) -> str:
    """Where a model's context limit comes from, for the message refusing a longer prompt."""
    if config.rope_scaling is None:
        return ' (max_position_embeddings; a rope_scaling such as {"rope_type": "yarn", ' \
               '"factor": 4} extends it)'
    spec = config.rope_spec
    return f" (rope_type {spec.rope_type!r} over an original context of {spec.original_length})"


def llama_twin(config: BambaConfig) -> BambaConfig:
    """The all-attention model of the same width and depth (full-width RoPE, Llama layout:
    none of Granite's multipliers or experts)."""
    return config.replace(model_type="llama", partial_rotary_factor=1.0,
                          attn_layer_indices=list(range(config.num_hidden_layers)),
                          embedding_multiplier=1.0, residual_multiplier=1.0,
                          attention_multiplier=None, logits_scaling=1.0,
                          position_embedding_type="rope", num_local_experts=0)


PRESETS: dict[str, dict[str, Any]] = {
    # The released 9B model (ibm-ai-platform/Bamba-9B-v2).
    "bamba-9b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                     attn_layer_indices=[9, 18, 27], mamba_n_heads=128, mamba_d_head=64,
                     mamba_d_state=128, mamba_chunk_size=256),
    # The 9B layout scaled to hidden 512: the benchmark shape (~173M parameters).
    "bench": dict(vocab_size=32000, hidden_size=512, intermediate_size=1792, num_hidden_layers=32,
                  num_attention_heads=8, num_key_value_heads=2, attn_layer_indices=[9, 18, 27],
                  mamba_n_heads=16, mamba_d_head=64, mamba_d_state=128, mamba_chunk_size=256,
                  max_position_embeddings=65536),
    # The bench shape as a dense Granite 4.0 hybrid: the fused MLP, no rotary positions, and
    # multipliers on embeddings, residual branches, scores and logits (their values do not
    # change the work: illustrative ones).
    "bench-granite": dict(vocab_size=32000, hidden_size=512, intermediate_size=1792,
                          num_hidden_layers=32, num_attention_heads=8, num_key_value_heads=2,
                          attn_layer_indices=[9, 18, 27], mamba_n_heads=16, mamba_d_head=64,
                          mamba_d_state=128, mamba_chunk_size=256, max_position_embeddings=65536,
                          model_type="granitemoehybrid", position_embedding_type="nope",
                          partial_rotary_factor=1.0, embedding_multiplier=12.0,
                          residual_multiplier=0.246, attention_multiplier=0.015625,
                          logits_scaling=3.0),
    # bench-granite with experts beside its shared MLP, near h-tiny's proportions (6 experts a
    # token; 32 of them here, where h-tiny has 64; half the hidden width each, where h-tiny's
    # are a third: the quantized kernels take widths that are multiples of 128).
    "bench-granite-moe": dict(vocab_size=32000, hidden_size=512, intermediate_size=512,
                              num_hidden_layers=32, num_attention_heads=8, num_key_value_heads=2,
                              attn_layer_indices=[9, 18, 27], mamba_n_heads=16, mamba_d_head=64,
                              mamba_d_state=128, mamba_chunk_size=256,
                              max_position_embeddings=65536, model_type="granitemoehybrid",
                              position_embedding_type="nope", partial_rotary_factor=1.0,
                              embedding_multiplier=12.0, residual_multiplier=0.246,
                              attention_multiplier=0.015625, logits_scaling=3.0,
                              num_local_experts=32, num_experts_per_tok=6,
                              expert_intermediate_size=256),
    # Near the shape IBM published for granite-4.0-h-tiny (hidden 1536, 40 layers of which 4
    # attention, 64 experts of width 512 with 6 a token beside a 1024-wide shared MLP, vocab
    # 100352; ~6.9B parameters, ~1.5B active a token); for benchmarks with random weights.
    "granite-h-tiny-shape": dict(vocab_size=100352, hidden_size=1536, intermediate_size=1024,
                                 num_hidden_layers=40, num_attention_heads=12,
                                 num_key_value_heads=4, attn_layer_indices=[5, 15, 25, 35],
                                 mamba_n_heads=48, mamba_d_head=64, mamba_d_state=128,
                                 mamba_chunk_size=256, max_position_embeddings=131072,
                                 model_type="granitemoehybrid", position_embedding_type="nope",
                                 partial_rotary_factor=1.0, embedding_multiplier=12.0,
                                 residual_multiplier=0.22, attention_multiplier=0.0078125,
                                 logits_scaling=6.0, num_local_experts=64,
                                 num_experts_per_tok=6, expert_intermediate_size=512,
                                 tie_word_embeddings=True),
    # Small enough to train for minutes on two CPU cores; the embedded default.
    "tiny": dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                 num_attention_heads=4, num_key_value_heads=2, attn_layer_indices=[3, 7],
                 mamba_n_heads=8, mamba_d_head=64, mamba_d_state=64, mamba_chunk_size=64,
                 max_position_embeddings=8192),
}

# Near the shape IBM published for granite-4.0-h-1b: bench-granite (the dense hybrid) at hidden
# 1536, 40 layers of which 4 attention, MLP 4096, vocab 100352, tied; ~1.46B parameters; for
# benchmarks with random weights (the multipliers illustrative, bench-granite's).
PRESETS["granite-h-1b-shape"] = dict(
    PRESETS["bench-granite"], vocab_size=100352, hidden_size=1536, intermediate_size=4096,
    num_hidden_layers=40, num_attention_heads=12, num_key_value_heads=4,
    attn_layer_indices=[5, 15, 25, 35], mamba_n_heads=48, logits_scaling=6.0,
    tie_word_embeddings=True)


def preset(name: str, **overrides: Any) -> BambaConfig:
    """A named configuration; ``name`` must match exactly."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return BambaConfig(**{**PRESETS[name], **overrides})
