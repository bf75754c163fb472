"""The hybrid Mamba2/attention language model as thin nn.Modules over ``bamba.ops``: plain
torch, the reference every fast path is held equal to.

Parameter names equal transformers' ``BambaForCausalLM`` (``model.layers.N.mamba.in_proj.weight``
...), so a Hugging Face state dict loads with ``load_state_dict`` unchanged.

Inference state lives outside the modules, in an ``InferenceCache`` (``bamba.cache_protocol``):
the forward pass asks it for the Mamba states of the rows in the batch and for the keys/values
of the attention layers.

Fast paths are installed from outside, by swapping these modules for subclasses that override
the methods marked "kernel seam" below; a model built here runs torch ops only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bamba.cache_protocol import InferenceCache
from bamba.checkpoint_writer import save_pretrained
from bamba.config import GRANITE, BambaConfig
from bamba.generation_defaults import GenerationDefaults
from bamba.ops.attention import attention, causal_mask
from bamba.ops.experts import mixture, route
from bamba.ops.mixer import MixerShape, MixerWeights, mamba_decode_step, mamba_prefill
from bamba.ops.norm import rms_norm
from bamba.ops.rope import apply_rope, rope_cos_sin

# Small per-head parameters that feed exp/softplus stay float32 whatever the weight dtype.
FP32_PARAMS = ("A_log", "D", "dt_bias")

Rope = tuple[torch.Tensor, torch.Tensor]
# Query rows of one masked attention call over a cache: the mask of a call is [QUERY_BLOCK, T]
# (bool, then the model dtype inside torch's kernel), ~100 MB at 128K keys, whatever the chunk.
QUERY_BLOCK = 256


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: BambaConfig):
        super().__init__()
        h, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, f, bias=bias)
        self.up_proj = nn.Linear(h, f, bias=bias)
        self.down_proj = nn.Linear(f, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.swiglu(self.gate_proj(x), self.up_proj(x)))

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # kernel seam
        return F.silu(gate) * up

    @property
    def width(self) -> int:
        """The inner (intermediate) width."""
        return self.down_proj.in_features


class ExpertWeights(nn.Module):
    """One weight per expert, stacked: [E, out, in] (``bamba.quant.experts`` holds them
    quantized)."""

    bias = None

    def __init__(self, experts: int, out_features: int, in_features: int):
        super().__init__()
        self.experts, self.out_features, self.in_features = experts, out_features, in_features
        self.weight = nn.Parameter(torch.empty(experts, out_features, in_features))

    def expert(self, index: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert ``index``'s [out, in] weight."""
        return self.weight[index]


class Router(nn.Module):
    def __init__(self, hidden: int, experts: int):
        super().__init__()
        self.layer = nn.Linear(hidden, experts, bias=False)


class Experts(nn.Module):
    """Granite's mixture of experts (``bamba.ops.experts``): each token through the top
    ``top_k`` of the experts its router picks, weighted. Names as Granite's checkpoints have
    them under ``block_sparse_moe``."""

    def __init__(self, config: BambaConfig):
        super().__init__()
        h, f, e = config.hidden_size, config.expert_intermediate_size, config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.router = Router(h, e)
        self.input_linear = ExpertWeights(e, 2 * f, h)
        self.output_linear = ExpertWeights(e, h, f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, index = route(self.router.layer(flat), self.top_k, flat.dtype)
        return mixture(flat, weights, index,
                       lambda rows, e: self.product(self.input_linear, rows, e),
                       lambda rows, e: self.product(self.output_linear, rows, e)).view_as(x)

    def product(self, stacked: nn.Module, rows: torch.Tensor,
                expert: int) -> torch.Tensor:  # kernel seam
        """rows [R, in] times expert ``expert``'s weight of ``stacked`` (transposed)."""
        return F.linear(rows, stacked.expert(expert, rows.dtype))


class FusedMLP(MLP):
    """Granite's SwiGLU: gate and up as the two halves of one linear's output,
    output_linear(silu(gate) * up) with [gate | up] = input_linear(x); with experts (a Granite
    MoE hybrid) their mixture is added (the shared MLP beside them)."""

    def __init__(self, config: BambaConfig):
        nn.Module.__init__(self)
        h, f = config.hidden_size, config.intermediate_size
        self.input_linear = nn.Linear(h, 2 * f, bias=False)
        self.output_linear = nn.Linear(f, h, bias=False)
        self.experts = Experts(config) if config.num_local_experts else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.input_linear(x).chunk(2, dim=-1)
        shared = self.output_linear(self.swiglu(gate, up))
        return shared if self.experts is None else self.experts(x) + shared

    @property
    def width(self) -> int:
        return self.output_linear.in_features


def make_mlp(config: BambaConfig) -> MLP:
    """The feed-forward block of ``config``'s family: Granite's fused one, else SwiGLU."""
    return FusedMLP(config) if config.model_type == GRANITE else MLP(config)


class Attention(nn.Module):
    """Grouped-query attention with (partial) rotary embedding, or none (``rope`` None)."""

    def __init__(self, config: BambaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = (config.num_attention_heads,
                                                  config.num_key_value_heads, config.head_dim)
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=bias)
        self.scale = config.attention_multiplier  # None: head_dim ** -0.5

    def forward(self, x: torch.Tensor, rope: Rope, positions: torch.Tensor,
                cache: InferenceCache | None, seq_idx: torch.Tensor | None) -> torch.Tensor:
        attended = self.attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), rope, positions,
                               cache, seq_idx)
        return self.o_proj(attended)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: Rope,
               positions: torch.Tensor, cache: InferenceCache | None,
               seq_idx: torch.Tensor | None) -> torch.Tensor:
        """Projected q [B, L, H·D], k and v [B, L, Hkv·D] -> attention output [B, L, H·D]
        (rope applied, keys and values stored in and read from the cache), before o_proj."""
        b, l, _ = q.shape
        q = q.view(b, l, self.n_heads, self.head_dim)
        k = k.view(b, l, self.n_kv, self.head_dim)
        v = v.view(b, l, self.n_kv, self.head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is None:  # a whole sequence (or packed row: causal and within each document)
            mask = None if seq_idx is None else \
                causal_mask(torch.arange(l, device=q.device).expand(b, l), l, seq_idx)
            out = self.softmax_attention(q, k, v, mask)  # [B, L, H, D]
        else:
            k, v = cache.update_kv(self.layer_idx, k, v, positions)
            # Queries in blocks, each with its own mask [block, T]: a long prompt's chunk at a
            # long context never holds a mask over all its queries and keys at once.
            out = [self.softmax_attention(q[:, i:i + QUERY_BLOCK], k, v,
                                          causal_mask(positions[:, i:i + QUERY_BLOCK], k.shape[1]))
                   for i in range(0, l, QUERY_BLOCK)]
            out = out[0] if len(out) == 1 else torch.cat(out, dim=1)
        return out.reshape(b, l, self.n_heads * self.head_dim)

    def softmax_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          mask: torch.Tensor | None) -> torch.Tensor:  # kernel seam
        return attention(q, k, v, mask, scale=self.scale)


class Mamba2Mixer(nn.Module):
    """Mamba2 mixer with transformers' Bamba semantics.

    in_proj output splits as [z | xBC | dt]; xBC goes through the causal conv and silu, then
    splits as [x | B | C]; dt = clamp(softplus(dt + dt_bias), time_step_limit); the D skip uses
    x before dt scaling; the output is gated by silu(z) before a grouped RMS norm.
    """

    def __init__(self, config: BambaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.head_dim = config.mamba_n_heads, config.mamba_d_head
        self.n_groups, self.d_state = config.mamba_n_groups, config.mamba_d_state
        self.d_inner, self.conv_dim = config.d_inner, config.conv_dim
        self.chunk_size = config.mamba_chunk_size
        # The scan's result does not depend on its chunk length beyond rounding; 64 balances
        # the Q×Q work inside chunks against the loop over chunks on a CPU.
        self.scan_chunk = min(self.chunk_size, 64)
        self.time_step_limit = config.time_step_limit
        self.eps = config.rms_norm_eps
        self.in_proj = nn.Linear(config.hidden_size, self.d_inner + self.conv_dim + self.n_heads,
                                 bias=config.mamba_proj_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, config.mamba_d_conv,
                                groups=self.conv_dim, padding=config.mamba_d_conv - 1,
                                bias=config.mamba_conv_bias)
        self.dt_bias = nn.Parameter(torch.ones(self.n_heads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.n_heads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        self.norm = RMSNorm(self.d_inner, config.rms_norm_eps)  # weight only; applied gated
        self.out_proj = nn.Linear(self.d_inner, config.hidden_size, bias=config.mamba_proj_bias)
        self.shape = MixerShape(self.n_heads, self.head_dim, self.n_groups, self.d_state,
                                tuple(self.time_step_limit), self.eps)

    def forward(self, hidden: torch.Tensor, cache: InferenceCache | None,
                seq_idx: torch.Tensor | None) -> torch.Tensor:
        zxbcdt = self.in_proj(hidden)
        pools = None if cache is None else cache.mamba_pools(self.layer_idx)
        if pools is not None and hidden.shape[1] == 1:  # decode: states advance in their pools
            y = self.decode_middle(zxbcdt[:, 0], pools)[:, None]
        else:
            y = self.prefill_middle(zxbcdt, pools, seq_idx)
        return self.out_proj(y.to(hidden.dtype))

    def decode_middle(self, zxbcdt: torch.Tensor, pools: tuple) -> torch.Tensor:  # kernel seam
        """in_proj's output [B, ...] of one token -> y [B, d_inner], the states advanced."""
        return mamba_decode_step(zxbcdt, *pools, self.weights(), self.shape)

    def prefill_middle(self, zxbcdt: torch.Tensor, pools: tuple | None,
                       seq_idx: torch.Tensor | None) -> torch.Tensor:  # kernel seam
        """in_proj's output [B, L, ...] -> y [B, L, d_inner] (from and into ``pools``)."""
        return mamba_prefill(zxbcdt, pools, self.weights(), self.shape, seq_idx,
                             self.scan_chunk, scan_matmul_dtype(zxbcdt.dtype))

    def weights(self) -> MixerWeights:
        return MixerWeights(self.conv1d.weight[:, 0], self.conv1d.bias, self.dt_bias, self.A_log,
                            self.D, self.norm.weight)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: mixer (Mamba2 or attention), then SwiGLU MLP."""

    def __init__(self, config: BambaConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.layer_type == "mamba":
            self.mamba = Mamba2Mixer(config, layer_idx)
        elif self.layer_type == "attention":
            self.self_attn = Attention(config, layer_idx)
        else:
            raise ValueError(f"unknown layer type {self.layer_type!r}")
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = make_mlp(config)
        self.residual_multiplier = config.residual_multiplier

    def forward(self, x: torch.Tensor, rope: Rope, positions: torch.Tensor,
                cache: InferenceCache | None, seq_idx: torch.Tensor | None) -> torch.Tensor:
        h = self.input_layernorm(x)
        if self.layer_type == "mamba":
            h = self.mamba(h, cache, seq_idx)
        else:
            h = self.self_attn(h, rope, positions, cache, seq_idx)
        x = x + self.scaled(h)
        return x + self.scaled(self.feed_forward(self.pre_ff_layernorm(x)))

    def scaled(self, branch: torch.Tensor) -> torch.Tensor:
        """A residual branch times residual_multiplier (Granite's), rounded as transformers
        rounds it, before the sum."""
        return branch if self.residual_multiplier == 1.0 else branch * self.residual_multiplier


class Backbone(nn.Module):
    def __init__(self, config: BambaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class BambaLM(nn.Module):
    """Causal LM: ``model(input_ids)`` -> logits [B, L, V].

    Keyword arguments for inference and training:
      positions [B, L]: absolute positions (default 0..L-1, or restarting per document).
      cache: an ``InferenceCache``; Mamba states and KV are read and written through it.
      seq_idx [B, L]: document ids of a packed row; state, conv and attention reset at each
        new id (training on packed documents; no cache).
      logits_to_keep: compute logits for only the last n positions (0 = all).
      rope_lengths [B, L]: the sequence length each token's length-dependent RoPE scaling
        (dynamic NTK, LongRoPE) is chosen for; default: its row's last position + 1, as
        transformers does. A chunked prefill passes the whole prompt's length.
    """

    def __init__(self, config: BambaConfig):
        super().__init__()
        self.config = config
        # what the checkpoint's generation_config.json asks (``from_pretrained`` reads it)
        self.generation_defaults = GenerationDefaults()
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.tie_weights()

    def tie_weights(self) -> None:
        """The LM head reads the token table (tie_word_embeddings): the table's own parameter,
        or for a quantized table (``QuantizedEmbedding``) a quantized linear holding its
        tensors, so the table is held once and the head streams it as stored."""
        embed = self.model.embed_tokens
        if isinstance(embed, nn.Embedding):
            if not isinstance(self.lm_head, nn.Linear):  # the quantized table's, made dense
                self.lm_head = nn.Linear(embed.embedding_dim, embed.num_embeddings, bias=False,
                                         device="meta")
            self.lm_head.weight = embed.weight
        else:
            self.lm_head = embed.tied_head()

    def forward(self, input_ids: torch.Tensor, *, positions: torch.Tensor | None = None,
                cache: InferenceCache | None = None, seq_idx: torch.Tensor | None = None,
                logits_to_keep: int = 0, rope_lengths: torch.Tensor | None = None
                ) -> torch.Tensor:
        hidden = self.hidden_states(input_ids, positions=positions, cache=cache, seq_idx=seq_idx,
                                    rope_lengths=rope_lengths)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.logits(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states -> logits: the LM head, divided by logits_scaling
        (Granite's; 1 elsewhere)."""
        logits = self.lm_head(hidden)
        scaling = self.config.logits_scaling
        return logits if scaling == 1.0 else logits / scaling

    def hidden_states(self, input_ids: torch.Tensor, *, positions: torch.Tensor | None = None,
                      cache: InferenceCache | None = None, seq_idx: torch.Tensor | None = None,
                      rope_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states [B, L, hidden] (what the LM head and losses consume)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if seq_idx is not None and cache is not None:
            raise ValueError("seq_idx (packed documents) is for cache-free forward passes")
        b, l = input_ids.shape
        if positions is None:
            positions = _default_positions(b, l, seq_idx, input_ids.device)
        x = self.model.embed_tokens(input_ids)
        cfg = self.config
        if cfg.embedding_multiplier != 1.0:
            x = x * cfg.embedding_multiplier
        rope = rope_cos_sin(positions, cfg.rope_spec, x.dtype, rope_lengths) \
            if cfg.uses_rope else None
        return self.layers_then_norm(x, rope, positions, cache, seq_idx)

    def layers_then_norm(self, x: torch.Tensor, rope: Rope | None, positions: torch.Tensor,
                         cache: InferenceCache | None,
                         seq_idx: torch.Tensor | None) -> torch.Tensor:  # kernel seam
        """The embedded tokens [B, L, hidden] through every decoder layer and the final norm."""
        for layer in self.model.layers:
            x = layer(x, rope, positions, cache, seq_idx)
        return self.model.final_layernorm(x)

    def save_pretrained(self, directory: str, **kwargs) -> None:
        """Write config.json + safetensors in the Hugging Face layout (see bamba.checkpoint)."""
        save_pretrained(self, directory, **kwargs)

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype: the embeddings' (an lm_head may hold quantized weights;
        quantized embeddings name it as ``output_dtype``)."""
        embed = self.model.embed_tokens
        return embed.weight.dtype if isinstance(embed, nn.Embedding) else embed.output_dtype

    @property
    def device(self) -> torch.device:
        return self.model.final_layernorm.weight.device


def scan_matmul_dtype(dtype: torch.dtype) -> torch.dtype:
    """The scan's read-out matmuls run in a half-precision model's own dtype, else float32."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def _default_positions(b: int, l: int, seq_idx: torch.Tensor | None,
                       device: torch.device) -> torch.Tensor:
    """0..L-1 per row, or restarting at 0 at every new document of a packed row."""
    steps = torch.arange(l, device=device).expand(b, l)
    if seq_idx is None:
        return steps
    new_doc = torch.ones_like(seq_idx, dtype=torch.bool)
    new_doc[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    starts = torch.cummax(torch.where(new_doc, steps, torch.zeros_like(steps)), dim=1).values
    return steps - starts


@torch.no_grad()
def init_weights(model: BambaLM, seed: int | None = None) -> BambaLM:
    """Random initialisation for training from scratch (GPT-2 style scaled residual projections,
    Mamba2's log-uniform time steps). Deterministic for a given seed."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    std = model.config.initializer_range
    residual_std = std / math.sqrt(2 * model.config.num_hidden_layers)
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight",
                          "output_linear.weight")):
            param.copy_(torch.randn(param.shape, generator=gen) * residual_std)
        elif "conv1d.weight" in name:
            bound = 1.0 / math.sqrt(param.shape[-1])
            param.copy_(torch.rand(param.shape, generator=gen) * 2 * bound - bound)
        elif leaf == "weight" and param.dim() >= 2:  # matrices, a MoE's stacked experts too
            param.copy_(torch.randn(param.shape, generator=gen) * std)
        elif leaf == "bias":
            param.zero_()
        elif leaf == "dt_bias":
            # dt ~ log-uniform [1e-3, 1e-1]; store its inverse softplus.
            dt = torch.exp(torch.rand(param.shape, generator=gen)
                           * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            param.copy_(dt + torch.log(-torch.expm1(-dt)))
        elif leaf == "A_log":
            param.copy_(torch.log(torch.arange(1, param.numel() + 1, dtype=torch.float32)))
        elif leaf in ("D", "weight"):  # D skip and norm weights
            param.fill_(1.0)
        else:
            raise AssertionError(f"no initialisation rule for {name}")
    return model


@torch.no_grad()
def cast(model: BambaLM, dtype: torch.dtype) -> BambaLM:
    """Cast the parameters to ``dtype`` in place (same Parameter objects), except
    ``FP32_PARAMS``, which stay float32 as ``from_pretrained`` loads them."""
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    for name, param in model.named_parameters():
        keep = name.rsplit(".", 1)[-1] in FP32_PARAMS
        param.data = param.data.to(torch.float32 if keep else dtype)
    return model
