"""Arithmetic intensity of a hybrid Mamba2/attention model and of its all-attention twin.

Pure functions of a ``BambaConfig``, a batch ``b``, a sequence length ``s`` and the dtypes.
Two models live here:

* The **exact model** counts from the real config: parameters per tensor (these equal the
  ``numel`` of ``bamba.model.BambaLM``'s parameters), FLOPs and bytes moved by one prefill
  and by one decode step, KV and state memory per request. Decode is memory-bound, so the
  predicted decode speed-up of the hybrid over its twin (``bamba.config.llama_twin``) is the
  ratio of their decode bytes.
* The **appendix model** (``appendix_elements``) reproduces the simplified formulas of the
  Bamba release's appendix (element counts; GQA 4:1, MLP 3.5x, SSD state d, head dim d/2,
  4h/d heads) so both predictions can be printed side by side.

Conventions of the exact model, and where it departs from the appendix (and why):

* FLOPs: a matmul is 2·m·n·k. Attention scores and values cost 4·queries·keys·H·D per layer
  with the real query heads H and head dim D; prefill counts the full s×s square, as the
  appendix's 4bs²h does (a causal flash kernel skips about half of it). The SSD scan counts
  the chunked algorithm on ceil(s/Q) full chunks: C·Bᵀ per group and chunk (2·L·Q·G·N),
  chunk outputs (2·L·Q·H·P), chunk states and their read-out (2·L·H·P·N each) and the
  chunk-to-chunk pass (2·c·H·P·N); a decode step costs 5·H·P·N (decay, outer product, add,
  read-out). The appendix writes 4bsdh = 2·s·H·P·N for both, i.e. it leaves out the
  intra-chunk quadratic term and the state update. The depthwise conv costs 2·K per channel
  and token. Element-wise work (norms, activations, RoPE, residuals) is left out: O(b·s·h)
  per layer, well under 1%.
* The LM head: prefill computes logits for the last position of each sequence only (what
  generation needs); decode computes them every step. The appendix excludes embedding and
  head ("model size excluding the embedding layer"); the exact model reads the head matrix
  (V·h elements) every step, which lowers the speed-up at small batches: for the bench
  shape V·h = 62.5h², 15% of the twin's layer weights.
* Weights: every non-embedding parameter is read once per step at the weight dtype, plus the
  head matrix, plus the embedding rows gathered for the step's tokens. Activations are not
  counted (b·h per layer).
* Experts (Granite 4.0 MoE hybrids): a token multiplies its router ([E, h]) and the k experts it
  picks (3·F·h each, F an expert's width); a step reads the router whole and, of each layer's
  E experts, those its t tokens pick: E·(1 − (1 − k/E)^t) in expectation when each token picks
  k distinct experts uniformly and independently (real routers are skewed: fewer). Their twin
  is the same model with attention in every layer, experts kept; the appendix, which has no
  experts, is not printed for them.
* Mamba2 mixer size: the appendix's 15.5h²l means about 5h² per mixer, but the real in_proj
  has 2·expand·h + 2·G·N + H outputs (z, x, B, C, dt) and out_proj expand·h inputs, i.e.
  6h² + h·(2GN + H) per mixer: the exact hybrid's layer weights are 16.3h²l for Bamba-9B
  and 16.7h²l for the bench shape, 5% and 8% above the appendix's.
* KV cache: a decode step at context length s reads s keys and values per attention layer
  (2·b·s·Hkv·D, the new token included) and writes one; prefill writes s. With GQA 4:1 and
  D·H = h this is the appendix's 0.5bsh per layer.
* Mamba state: conv state (K-1)·conv_dim plus SSM state H·P·N per layer and sequence, both at
  the state dtype, read and written once per step (prefill too: chunked prefill carries it).
  The appendix counts only the SSM state (4bdh = 2·H·P·N, read+write) in elements; with a
  float32 state and bf16 weights the exact state traffic weighs twice as much relative to
  the weights and KV cache.

What that does to the predictions (decode speed-up, twin bytes / hybrid bytes; bf16 weights and
KV): for the bench shape at 1K/b=32, 4K/b=8, 8K/b=32, 16K/b=32 the appendix gives 0.95x, 1.75x,
3.93x, 5.68x; the exact model gives 0.58x, 1.28x, 2.65x, 4.17x with a float32 state and 0.91x,
1.61x, 3.74x, 5.46x with a bf16 state. A float32 state read and written every step (15.6 MB
per sequence, 1.0 GB a step at b=32) is three times the bench hybrid's weights; the rest of
the gap is the LM head and the larger mixer. For Bamba-9B the appendix's "≈5x beyond 16K" holds once the KV cache
dominates the weights, about 2M tokens in flight: 4.98x at b=128, 16K (5.75x at b=64, 32K; the
ratio keeps growing towards l/l_attn = 10.7x). The exact model gives 3.81x there, and 4.81x
(b=64, 32K), 5.54x (b=128, 32K), 5.55x (b=32, 64K) with a float32 state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from bamba.config import BambaConfig, llama_twin

DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1, "int8": 1}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
                  "fp8": "float8", "float8_e4m3fn": "float8"}

# Modules whose ``weight`` is a matrix multiplied by every token's activations.
MATMULS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj",
                     "gate_proj", "up_proj", "down_proj"})


def canonical_dtype(name: str) -> str:
    """'bf16' -> 'bfloat16'; ValueError naming the known dtypes otherwise."""
    key = _DTYPE_ALIASES.get(name.lower(), name.lower())
    if key not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPE_BYTES)}")
    return key


@dataclass(frozen=True)
class Precision:
    """Storage dtypes: weights, KV cache, Mamba state (conv + SSM)."""

    weights: str = "bfloat16"
    kv: str = "bfloat16"
    state: str = "float32"

    def __post_init__(self) -> None:
        for name in ("weights", "kv", "state"):
            object.__setattr__(self, name, canonical_dtype(getattr(self, name)))

    @property
    def weight_bytes(self) -> int:
        return DTYPE_BYTES[self.weights]

    @property
    def kv_bytes(self) -> int:
        return DTYPE_BYTES[self.kv]

    @property
    def state_bytes(self) -> int:
        return DTYPE_BYTES[self.state]


# ---- parameters ------------------------------------------------------------------------------
def _linear(name: str, n_in: int, n_out: int, bias: bool) -> dict[str, int]:
    out = {f"{name}.weight": n_in * n_out}
    if bias:
        out[f"{name}.bias"] = n_out
    return out


def attention_params(c: BambaConfig) -> dict[str, int]:
    """Parameters of one attention mixer, by name relative to the mixer module."""
    h, q_width, kv_width = c.hidden_size, c.num_attention_heads * c.head_dim, \
        c.num_key_value_heads * c.head_dim
    return {**_linear("q_proj", h, q_width, c.attention_bias),
            **_linear("k_proj", h, kv_width, c.attention_bias),
            **_linear("v_proj", h, kv_width, c.attention_bias),
            **_linear("o_proj", q_width, h, c.attention_bias)}


def mamba_params(c: BambaConfig) -> dict[str, int]:
    """Parameters of one Mamba2 mixer: in_proj to [z | xBC | dt], conv, dt_bias/A_log/D, norm,
    out_proj."""
    h, n_heads = c.hidden_size, c.mamba_n_heads
    params = _linear("in_proj", h, c.d_inner + c.conv_dim + n_heads, c.mamba_proj_bias)
    params["conv1d.weight"] = c.conv_dim * c.mamba_d_conv
    if c.mamba_conv_bias:
        params["conv1d.bias"] = c.conv_dim
    params.update({"dt_bias": n_heads, "A_log": n_heads, "D": n_heads,
                   "norm.weight": c.d_inner})
    params.update(_linear("out_proj", c.d_inner, h, c.mamba_proj_bias))
    return params


def mlp_params(c: BambaConfig) -> dict[str, int]:
    """The feed-forward block's: the SwiGLU linears, and a Granite MoE's experts and router
    (counted whole: weights a model holds, not those a token reads)."""
    h, f, bias = c.hidden_size, c.intermediate_size, c.mlp_bias
    params = {**_linear("gate_proj", h, f, bias), **_linear("up_proj", h, f, bias),
              **_linear("down_proj", f, h, bias)}
    e, fe = c.num_local_experts, c.expert_intermediate_size
    if e:
        params.update({"experts.router.layer.weight": e * h,
                       "experts.input_linear.weight": e * 2 * fe * h,
                       "experts.output_linear.weight": e * fe * h})
    return params


def layer_params(c: BambaConfig, kind: str) -> dict[str, int]:
    """Parameters of one decoder layer of ``kind`` ("attention" or "mamba"), named as in
    ``BambaLM.model.layers[i]``."""
    if kind == "attention":
        mixer = {f"self_attn.{k}": v for k, v in attention_params(c).items()}
    elif kind == "mamba":
        mixer = {f"mamba.{k}": v for k, v in mamba_params(c).items()}
    else:
        raise ValueError(f"unknown layer kind {kind!r}")
    mlp = {f"feed_forward.{k}": v for k, v in mlp_params(c).items()}
    return {"input_layernorm.weight": c.hidden_size, **mixer,
            "pre_ff_layernorm.weight": c.hidden_size, **mlp}


def matmul_weights(params: dict[str, int]) -> int:
    """Elements of the matmul weight matrices among ``params`` (each costs 2 FLOPs a token)."""
    return sum(n for name, n in params.items()
               if name.endswith(".weight") and name.split(".")[-2] in MATMULS)


def param_breakdown(c: BambaConfig) -> dict[str, int]:
    """Parameter counts by kind: embedding, lm_head (0 when tied), attention and mamba mixers,
    mlp, norms. Their sum is ``sum(p.numel() for p in BambaLM(c).parameters())``."""
    out = {"embedding": c.vocab_size * c.hidden_size,
           "lm_head": 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size,
           "attention": 0, "mamba": 0, "mlp": 0, "norms": c.hidden_size}
    for kind in c.layer_types:
        for name, n in layer_params(c, kind).items():
            group = name.split(".")[0]
            key = {"self_attn": "attention", "mamba": "mamba", "feed_forward": "mlp"}.get(
                group, "norms")
            out[key] += n
    return out


def parameter_count(c: BambaConfig) -> int:
    return sum(param_breakdown(c).values())


def expert_params(c: BambaConfig) -> int:
    """One expert's parameters (its gate, up and down projections)."""
    return 3 * c.expert_intermediate_size * c.hidden_size


def experts_touched(c: BambaConfig, tokens: int) -> float:
    """Expected experts of a layer that ``tokens`` tokens pick between them (uniform routing:
    each token k distinct of E); 0 without experts."""
    e, k = c.num_local_experts, c.num_experts_per_tok
    return 0.0 if not e else e * (1 - (1 - k / e) ** tokens)


def active_parameter_count(c: BambaConfig) -> int:
    """Parameters a token multiplies or looks up: all but the experts it does not pick."""
    unpicked = (c.num_local_experts - c.num_experts_per_tok) * expert_params(c)
    return parameter_count(c) - (c.num_hidden_layers * unpicked if c.num_local_experts else 0)


def attention_twin(c: BambaConfig) -> BambaConfig:
    """The all-attention model the hybrid is compared with: ``llama_twin``, or for a model
    with experts (which a Llama layout has no place for) the same model with attention in
    every layer."""
    if not c.num_local_experts:
        return llama_twin(c)
    return c.replace(attn_layer_indices=list(range(c.num_hidden_layers)))


# ---- per-request memory ----------------------------------------------------------------------
def kv_bytes_per_token(c: BambaConfig, precision: Precision) -> int:
    """Keys and values of one token over all attention layers."""
    return len(c.attn_layer_indices) * 2 * c.num_key_value_heads * c.head_dim * precision.kv_bytes


def state_elements_per_layer(c: BambaConfig) -> int:
    """Conv state (K-1)·conv_dim plus SSM state H·P·N of one Mamba layer and sequence."""
    return (c.mamba_d_conv - 1) * c.conv_dim + c.mamba_n_heads * c.mamba_d_head * c.mamba_d_state


def state_bytes_per_sequence(c: BambaConfig, precision: Precision) -> int:
    """Fixed Mamba state of one sequence over all Mamba layers, whatever its length."""
    return len(c.mamba_layer_indices) * state_elements_per_layer(c) * precision.state_bytes


# ---- FLOPs -----------------------------------------------------------------------------------
def attention_core_flops(c: BambaConfig, queries: int, keys: int) -> int:
    """Scores (q·kᵀ) and weighted values of one layer and sequence: 4·queries·keys·H·D."""
    return 4 * queries * keys * c.num_attention_heads * c.head_dim


def ssd_prefill_terms(c: BambaConfig, s: int) -> dict[str, int]:
    """FLOPs of the chunked SSD scan of one layer over one sequence of s tokens, by step:
    C·Bᵀ per group, chunk outputs, chunk states, the chunk-to-chunk pass, the state read-out."""
    h, p, n, g, q = (c.mamba_n_heads, c.mamba_d_head, c.mamba_d_state, c.mamba_n_groups,
                     c.mamba_chunk_size)
    chunks = -(-s // q)
    padded = chunks * q  # the last chunk is computed whole
    return {"cb": 2 * padded * q * g * n, "diagonal": 2 * padded * q * h * p,
            "chunk_states": 2 * padded * h * p * n, "state_pass": 2 * chunks * h * p * n,
            "readout": 2 * padded * h * p * n}


def ssd_prefill_flops(c: BambaConfig, s: int) -> int:
    return sum(ssd_prefill_terms(c, s).values())


def ssd_decode_flops(c: BambaConfig) -> int:
    """One recurrent step of one layer and sequence: decay, x⊗B and add (3·HPN), read-out
    (2·HPN)."""
    return 5 * c.mamba_n_heads * c.mamba_d_head * c.mamba_d_state


def conv_flops(c: BambaConfig, tokens: int) -> int:
    return 2 * tokens * c.mamba_d_conv * c.conv_dim


def _mixer_flops(c: BambaConfig, kind: str, b: int, s: int, decode: bool) -> int:
    """Non-matmul work of one layer's mixer for the whole batch."""
    if kind == "attention":
        return b * attention_core_flops(c, 1 if decode else s, s)
    if kind == "mamba":
        if decode:
            return b * (conv_flops(c, 1) + ssd_decode_flops(c))
        return b * (conv_flops(c, s) + ssd_prefill_flops(c, s))
    raise ValueError(f"unknown layer kind {kind!r}")


# ---- costs -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cost:
    """FLOPs and bytes moved by one forward step."""

    flops: int
    weight_bytes: int
    kv_bytes: int
    state_bytes: int

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.state_bytes

    @property
    def intensity(self) -> float:
        """FLOPs per byte moved."""
        return self.flops / self.bytes

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bytes": self.bytes, "flops_per_byte": self.intensity}


def _check_bs(b: int, s: int) -> None:
    for name, value, low in (("batch", b, 1), ("sequence length", s, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _weight_bytes(c: BambaConfig, tokens: int, precision: Precision) -> int:
    """Non-embedding weights + the head matrix, read once (of the experts, those the tokens
    pick); embedding rows gathered per token."""
    parts = param_breakdown(c)
    head = c.vocab_size * c.hidden_size
    resident = sum(parts.values()) - parts["embedding"] - parts["lm_head"] + head
    if c.num_local_experts:
        unread = c.num_local_experts - experts_touched(c, tokens)
        resident -= round(c.num_hidden_layers * unread * expert_params(c))
    return (resident + tokens * c.hidden_size) * precision.weight_bytes


def linear_flops(c: BambaConfig, tokens: int, logit_tokens: int) -> int:
    """Matmul FLOPs of every linear layer for ``tokens`` tokens (a router and its k experts a
    token), LM head for ``logit_tokens``."""
    per_token = sum(matmul_weights(layer_params(c, kind)) for kind in c.layer_types)
    if c.num_local_experts:
        routed = c.num_local_experts * c.hidden_size + c.num_experts_per_tok * expert_params(c)
        per_token += c.num_hidden_layers * routed
    return 2 * tokens * per_token + 2 * logit_tokens * c.vocab_size * c.hidden_size


def prefill_cost(c: BambaConfig, b: int, s: int, precision: Precision) -> Cost:
    """One prefill of b sequences of s tokens from an empty cache (logits for the last token)."""
    _check_bs(b, s)
    flops = linear_flops(c, b * s, logit_tokens=b)
    flops += sum(_mixer_flops(c, kind, b, s, decode=False) for kind in c.layer_types)
    return Cost(flops=flops, weight_bytes=_weight_bytes(c, b * s, precision),
                kv_bytes=b * s * kv_bytes_per_token(c, precision),
                state_bytes=2 * b * state_bytes_per_sequence(c, precision))


def decode_cost(c: BambaConfig, b: int, s: int, precision: Precision) -> Cost:
    """One decode step of b sequences at context length s (s keys attended, one KV written)."""
    _check_bs(b, s)
    flops = linear_flops(c, b, logit_tokens=b)
    flops += sum(_mixer_flops(c, kind, b, s, decode=True) for kind in c.layer_types)
    return Cost(flops=flops, weight_bytes=_weight_bytes(c, b, precision),
                kv_bytes=b * (s + 1) * kv_bytes_per_token(c, precision),
                state_bytes=2 * b * state_bytes_per_sequence(c, precision))


def decode_speedup(c: BambaConfig, b: int, s: int, precision: Precision) -> float:
    """Predicted decode speed-up over the all-attention twin: ratio of decode bytes moved."""
    twin = attention_twin(c)
    return decode_cost(twin, b, s, precision).bytes / decode_cost(c, b, s, precision).bytes


def crossover_length(c: BambaConfig, b: int, precision: Precision) -> int | None:
    """Shortest context at which the hybrid's decode step moves fewer bytes than the twin's;
    None if it never does. Decode bytes are affine in s, so two points define each line."""
    twin = attention_twin(c)
    hy0, hy1 = (decode_cost(c, b, s, precision).bytes for s in (0, 1))
    tw0, tw1 = (decode_cost(twin, b, s, precision).bytes for s in (0, 1))
    gap, closing = hy0 - tw0, (tw1 - tw0) - (hy1 - hy0)
    if gap < 0:
        return 0
    if closing <= 0:
        return None
    return gap // closing + 1  # first integer s with hy(s) < tw(s)


# ---- the appendix's simplified formulas ---------------------------------------------------
@dataclass(frozen=True)
class AppendixShape:
    """The appendix's letters: hidden h, layers l, attention layers l_attn, SSD state size d."""

    h: int
    l: int
    l_attn: int
    d: int = 128

    @property
    def l_ssd(self) -> int:
        return self.l - self.l_attn


def appendix_shape(c: BambaConfig) -> AppendixShape:
    """Letters from a config. d is the SSD state size (the appendix sets state d, head dim d/2):
    128 for both Bamba-9B and the bench shape, although bench's attention head dim is 64."""
    return AppendixShape(h=c.hidden_size, l=c.num_hidden_layers,
                         l_attn=len(c.attn_layer_indices), d=c.mamba_d_state)


def appendix_elements(shape: AppendixShape, b: int, s: int) -> dict[str, dict[str, float]]:
    """The appendix's table in elements (not bytes) for "attention" and "bamba"."""
    h, l, la, ls, d = shape.h, shape.l, shape.l_attn, shape.l_ssd, shape.d
    return {
        "attention": {
            "model_size": 13 * h * h * l,
            "prefill_compute": 26 * b * s * h * h * l + 4 * b * s * s * h * l,
            "prefill_memory": 13 * h * h * l + 0.5 * b * s * h * l,
            "decode_compute": 26 * b * h * h * l + 4 * b * s * h * l,
            "decode_memory": 13 * h * h * l + 0.5 * b * s * h * l,
        },
        "bamba": {
            "model_size": 15.5 * h * h * l,
            "prefill_compute": (31 * b * s * h * h * l + 4 * b * s * s * h * la
                                + 4 * b * s * d * h * ls),
            "prefill_memory": 15.5 * h * h * l + 0.5 * b * s * h * la + 4 * b * d * h * ls,
            "decode_compute": 31 * b * h * h * l + 4 * b * s * h * la + 4 * b * d * h * ls,
            "decode_memory": 15.5 * h * h * l + 0.5 * b * s * h * la + 4 * b * d * h * ls,
        },
    }


def appendix_decode_speedup(shape: AppendixShape, b: int, s: int) -> float:
    """The appendix's predicted speed-up: attention decode memory / Bamba decode memory."""
    table = appendix_elements(shape, b, s)
    return table["attention"]["decode_memory"] / table["bamba"]["decode_memory"]


# ---- the whole report ------------------------------------------------------------------------
def report(c: BambaConfig, batches: list[int], seqs: list[int], precision: Precision,
           name: str = "") -> dict[str, Any]:
    """Everything ``bamba analyze`` prints, as JSON-ready data."""
    if not batches or not seqs:
        raise ValueError("need at least one batch size and one sequence length")
    twin = attention_twin(c)
    shape = None if c.num_local_experts else appendix_shape(c)
    rows = []
    for b in batches:
        for s in seqs:
            hy_dec, tw_dec = decode_cost(c, b, s, precision), decode_cost(twin, b, s, precision)
            hy_pre, tw_pre = prefill_cost(c, b, s, precision), prefill_cost(twin, b, s, precision)
            rows.append({
                "batch": b, "seq": s,
                "hybrid": {"prefill": hy_pre.as_dict(), "decode": hy_dec.as_dict()},
                "twin": {"prefill": tw_pre.as_dict(), "decode": tw_dec.as_dict()},
                "decode_speedup": tw_dec.bytes / hy_dec.bytes,
                "appendix_decode_speedup": None if shape is None else
                appendix_decode_speedup(shape, b, s),
                "prefill_flops_ratio": tw_pre.flops / hy_pre.flops,
            })
    return {
        "config": name,
        "precision": asdict(precision),
        "layers": {"total": c.num_hidden_layers, "attention": len(c.attn_layer_indices),
                   "mamba": len(c.mamba_layer_indices)},
        "parameters": {"hybrid": {**param_breakdown(c), "total": parameter_count(c)},
                       "twin": {**param_breakdown(twin), "total": parameter_count(twin)}},
        "memory_per_request": {
            label: {"kv_bytes_per_token": kv_bytes_per_token(cfg, precision),
                    "state_bytes_per_sequence": state_bytes_per_sequence(cfg, precision)}
            for label, cfg in (("hybrid", c), ("twin", twin))},
        "crossover": [{"batch": b, "context_tokens": crossover_length(c, b, precision)}
                      for b in batches],
        "experts": None if not c.num_local_experts else {
            "count": c.num_local_experts, "per_token": c.num_experts_per_tok,
            "active_parameters": active_parameter_count(c)},
        "appendix_shape": None if shape is None else {**asdict(shape), "l_ssd": shape.l_ssd},
        "rows": rows,
    }
