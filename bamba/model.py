"""The hybrid Mamba2/attention language model as thin nn.Modules over ``bamba.ops``.

Parameter names equal transformers' ``BambaForCausalLM`` (``model.layers.N.mamba.in_proj.weight``
...), so a Hugging Face state dict loads with ``load_state_dict`` unchanged.

Inference state lives outside the modules, in an object satisfying ``InferenceCache``: the
forward pass asks it for the Mamba states of the rows in the batch and for the keys/values of
the attention layers. A contiguous cache (``bamba.cache``) serves ``generate``; the engine's
paged cache (KV blocks + state slots) satisfies the same protocol.
"""

from __future__ import annotations

import functools
import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from bamba import native
from bamba.config import BambaConfig
from bamba.native import decode_ops, elementwise_ops, layer_ops
from bamba.ops.attention import attention, causal_mask
from bamba.ops.mixer import MixerShape, MixerWeights, mamba_decode_step, mamba_prefill
from bamba.ops.norm import rms_norm
from bamba.ops.rope import apply_rope, rope_cos_sin


class InferenceCache(Protocol):
    """What the model needs from an inference cache for the rows of the current batch."""

    def mamba_pools(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(conv pool [S, K-1, conv_dim], SSM pool [S, H, P, N], rows): this batch's states are
        ``pool[rows]`` (rows: [B] int64), or the pools themselves, in batch order, when rows is
        None. The model reads them and writes the advanced states back in place."""

    def update_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor,
                  positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, L, Hkv, D] at positions [B, L]; return keys/values for positions
        0..T-1 of every row ([B, T, Hkv, D]), T = 1 + the largest position written."""

    # A cache may also offer the two methods below; then a decode step of at most
    # layer_ops.MAX_ROWS rows runs every layer in one native call (bamba.native.decode_ops),
    # which writes and reads keys and values in place:
    #   kv_pages(layer_idx) -> (keys, values, KVLayout): an attention layer's storage, token
    #       row r of KV head g at element g * head_stride + r * token_stride;
    #   token_rows(positions [B, 1]) -> (write [B], read [B, T]): the token rows of this
    #       token and of positions 0..T-1 of every row.


class Linear(nn.Linear):
    """``nn.Linear`` whose few-row bf16 inference calls (decode) go through ``bamba.native``'s
    weight-streaming kernel when it is built for this CPU; ``F.linear`` otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if native.use_linear_kernel(x, self.weight):
            return torch.ops.bamba.linear_rows(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


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
        self.gate_proj = Linear(h, f, bias=bias)
        self.up_proj = Linear(h, f, bias=bias)
        self.down_proj = Linear(f, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if elementwise_ops.usable(gate, up):  # one native pass for CPU inference
            return self.down_proj(elementwise_ops.silu_mul(gate, up))
        return self.down_proj(F.silu(gate) * up)


class Attention(nn.Module):
    """Grouped-query attention with (partial) rotary embedding."""

    def __init__(self, config: BambaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = (config.num_attention_heads,
                                                  config.num_key_value_heads, config.head_dim)
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = Linear(h, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, h, bias=bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                positions: torch.Tensor, cache: InferenceCache | None,
                seq_idx: torch.Tensor | None) -> torch.Tensor:
        attended = self.attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), rope, positions,
                               cache, seq_idx)
        return self.o_proj(attended)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               rope: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor,
               cache: InferenceCache | None, seq_idx: torch.Tensor | None) -> torch.Tensor:
        """Projected q [B, L, H·D], k and v [B, L, Hkv·D] -> attention output [B, L, H·D]
        (rope applied, keys and values stored in and read from the cache), before o_proj."""
        b, l, _ = q.shape
        q = q.view(b, l, self.n_heads, self.head_dim)
        k = k.view(b, l, self.n_kv, self.head_dim)
        v = v.view(b, l, self.n_kv, self.head_dim)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is None:  # a whole sequence (or packed row: causal and within each document)
            mask = None if seq_idx is None else \
                causal_mask(torch.arange(l, device=q.device).expand(b, l), l, seq_idx)
        else:
            k, v = cache.update_kv(self.layer_idx, k, v, positions)
            mask = causal_mask(positions, k.shape[1])
        out = attention(q, k, v, mask)  # [B, L, H, D]
        return out.reshape(b, l, self.n_heads * self.head_dim)


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
        self.in_proj = Linear(config.hidden_size, self.d_inner + self.conv_dim + self.n_heads,
                                 bias=config.mamba_proj_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, config.mamba_d_conv,
                                groups=self.conv_dim, padding=config.mamba_d_conv - 1,
                                bias=config.mamba_conv_bias)
        self.dt_bias = nn.Parameter(torch.ones(self.n_heads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.n_heads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        self.norm = RMSNorm(self.d_inner, config.rms_norm_eps)  # weight only; applied gated
        self.out_proj = Linear(self.d_inner, config.hidden_size, bias=config.mamba_proj_bias)
        self.shape = MixerShape(self.n_heads, self.head_dim, self.n_groups, self.d_state,
                                tuple(self.time_step_limit), self.eps)

    def forward(self, hidden: torch.Tensor, cache: InferenceCache | None,
                seq_idx: torch.Tensor | None) -> torch.Tensor:
        b, l, _ = hidden.shape
        zxbcdt = self.in_proj(hidden)
        if cache is not None and l == 1:  # decode: the states advance in place in their pools
            y = mamba_decode_step(zxbcdt[:, 0], *cache.mamba_pools(self.layer_idx),
                                  self.weights(), self.shape)
            return self.out_proj(y.to(hidden.dtype)[:, None])
        y = mamba_prefill(zxbcdt, cache.mamba_pools(self.layer_idx) if cache is not None
                          else None, self.weights(), self.shape, seq_idx, self.scan_chunk,
                          _matmul_dtype(hidden.dtype))
        return self.out_proj(y.to(hidden.dtype))

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
        self.feed_forward = MLP(config)
        self.step_dims = self._native_dims()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                positions: torch.Tensor, cache: InferenceCache | None,
                seq_idx: torch.Tensor | None) -> torch.Tensor:
        if cache is not None and self._native_step_fits(x):
            if self.layer_type == "mamba":
                return self._native_mamba_step(x, cache)
            return self._native_attention_step(x, rope, positions, cache)
        h = self.input_layernorm(x)
        if self.layer_type == "mamba":
            h = self.mamba(h, cache, seq_idx)
        else:
            h = self.self_attn(h, rope, positions, cache, seq_idx)
        x = x + h
        return x + self.feed_forward(self.pre_ff_layernorm(x))

    # One decode token through the whole layer in one native call (bamba.native.layer_ops):
    # for a few rows of bf16/float32 inference on a CPU with the kernels built.

    def _native_dims(self) -> layer_ops.LayerDims:
        ff, h = self.feed_forward, self.input_layernorm.weight.shape[0]
        if self.layer_type != "mamba":
            a = self.self_attn
            return layer_ops.LayerDims(h, 0, 0, 0, a.n_heads, a.head_dim, a.n_kv, 0,
                                       ff.gate_proj.out_features)
        m = self.mamba
        return layer_ops.LayerDims(h, m.d_inner, m.conv_dim, m.conv1d.kernel_size[0],
                                   m.n_heads, m.head_dim, m.n_groups, m.d_state,
                                   ff.gate_proj.out_features)

    def _native_step_fits(self, x: torch.Tensor) -> bool:
        # Not inside torch.compile: a graph calls a custom op through the dispatcher (~0.1 ms a
        # call), so compiled decode fuses the torch ops instead.
        return x.shape[1] == 1 and x.shape[0] <= layer_ops.MAX_ROWS and \
            x.device.type == "cpu" and not torch.is_grad_enabled() and \
            not torch.compiler.is_compiling() and \
            x.dtype == self.input_layernorm.weight.dtype and layer_ops.fits(x.dtype, self.step_dims)

    def _native_attention_step(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                               positions: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        a, b, eps = self.self_attn, x.shape[0], self.input_layernorm.eps
        x = x.view(b, -1)
        qkv = layer_ops.attention_in_step(x, _parameters(self, _ATTENTION_IN), self.step_dims,
                                          eps)
        kv_width = a.n_kv * a.head_dim
        q, k, v = qkv[:, None].split([a.n_heads * a.head_dim, kv_width, kv_width], dim=-1)
        attended = a.attend(q, k, v, rope, positions, cache, None)
        out = layer_ops.attention_out_step(x, attended.view(b, -1),
                                           _parameters(self, _ATTENTION_OUT), self.step_dims, eps)
        return out[:, None]

    def _native_mamba_step(self, x: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        m, b = self.mamba, x.shape[0]
        conv_pool, ssm_pool, rows = cache.mamba_pools(m.layer_idx)
        if rows is None:
            rows = _arange(b)
        out = layer_ops.mamba_layer_step(x.view(b, -1), conv_pool, ssm_pool, rows,
                                         _parameters(self, _MAMBA_LAYER),
                                         self.step_dims, m.eps, m.time_step_limit)
        return out[:, None]


# The parameters of the native layer steps, in the orders of layer_ops.MAMBA_TENSORS,
# ATTENTION_IN_TENSORS and ATTENTION_OUT_TENSORS, as paths under a DecoderLayer.
_FFN = (("pre_ff_layernorm", "weight"), ("feed_forward", "gate_proj", "weight"),
        ("feed_forward", "gate_proj", "bias"), ("feed_forward", "up_proj", "weight"),
        ("feed_forward", "up_proj", "bias"), ("feed_forward", "down_proj", "weight"),
        ("feed_forward", "down_proj", "bias"))
_MAMBA_LAYER = (("input_layernorm", "weight"), ("mamba", "in_proj", "weight"),
                ("mamba", "in_proj", "bias"), ("mamba", "conv1d", "weight"),
                ("mamba", "conv1d", "bias"), ("mamba", "dt_bias"), ("mamba", "A_log"),
                ("mamba", "D"), ("mamba", "norm", "weight"), ("mamba", "out_proj", "weight"),
                ("mamba", "out_proj", "bias")) + _FFN
_ATTENTION_IN = (("input_layernorm", "weight"), ("self_attn", "q_proj", "weight"),
                 ("self_attn", "q_proj", "bias"), ("self_attn", "k_proj", "weight"),
                 ("self_attn", "k_proj", "bias"), ("self_attn", "v_proj", "weight"),
                 ("self_attn", "v_proj", "bias"))
_ATTENTION_OUT = (("self_attn", "o_proj", "weight"), ("self_attn", "o_proj", "bias")) + _FFN


_ATTENTION_LAYER = _ATTENTION_IN + _ATTENTION_OUT  # decode_ops.ATTENTION_LAYER_TENSORS


def _parameters(module: nn.Module, paths: tuple[tuple[str, ...], ...]) -> list:
    """The parameters (None for an absent bias) at ``paths``, read from the modules' own
    dicts: nn.Module.__getattr__ costs ~0.5 us a lookup, ~20 us a layer per decode token."""
    found = []
    for path in paths:
        owner = module
        for name in path[:-1]:
            owner = owner._modules[name]
        found.append(owner._parameters.get(path[-1]))
    return found


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
    """

    def __init__(self, config: BambaConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # What the native decode step needs to know of the layers (fixed by the config).
        self.layer_kinds = [layer.layer_type == "attention" for layer in self.model.layers]
        self.kind_dims = {kind: next((layer.step_dims for layer in self.model.layers
                                      if (layer.layer_type == "attention") == kind), None)
                          for kind in (False, True)}

    def forward(self, input_ids: torch.Tensor, *, positions: torch.Tensor | None = None,
                cache: InferenceCache | None = None, seq_idx: torch.Tensor | None = None,
                logits_to_keep: int = 0) -> torch.Tensor:
        hidden = self.hidden_states(input_ids, positions=positions, cache=cache, seq_idx=seq_idx)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.lm_head(hidden)

    def hidden_states(self, input_ids: torch.Tensor, *, positions: torch.Tensor | None = None,
                      cache: InferenceCache | None = None,
                      seq_idx: torch.Tensor | None = None) -> torch.Tensor:
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
        rope = rope_cos_sin(positions, cfg.rotary_dim, cfg.rope_theta, x.dtype) \
            if cfg.attn_layer_indices else None
        out = self._native_decode(x, rope, positions, cache) \
            if cache is not None and self._native_decode_fits(x, cache) else None
        if out is not None:
            x = out
        else:
            for layer in self.model.layers:
                x = layer(x, rope, positions, cache, seq_idx)
        return self.model.final_layernorm(x)

    # One decode token through every layer in one native call (bamba.native.decode_ops): at
    # batch 1 the per-layer Python and torch glue cost ~4 ms of a 16 ms step.

    def _native_decode_fits(self, x: torch.Tensor, cache: InferenceCache) -> bool:
        return hasattr(cache, "token_rows") and x.shape[1] == 1 and \
            x.shape[0] <= layer_ops.MAX_ROWS and x.device.type == "cpu" and \
            not torch.is_grad_enabled() and not torch.compiler.is_compiling() and \
            not is_in_torch_dispatch_mode() and self._kinds_fit(x.dtype) and \
            not _has_hooks(self.model.layers)

    def _kinds_fit(self, dtype: torch.dtype) -> bool:
        """Whether layer_step.c takes both kinds of layer (their sizes) in ``dtype``."""
        return all(layer_ops.fits(dtype, dims) for dims in self.kind_dims.values() if dims)

    def _layer_tensors(self) -> list[list[torch.Tensor | None]]:
        """Every layer's parameters in decode_ops' order, looked up again only after some module
        registered a parameter, buffer or submodule (``_REGISTRATIONS``): the walk costs ~0.4 ms
        a token with the caches cold from streaming the weights. Tensors replaced in place
        (``.data``, ``.to``) keep their Parameter objects; decode_ops sees their new addresses.
        Deleting a parameter or setting it to None registers nothing: the torch path would then
        fail on the missing weight, this one would still read the old one."""
        cached = self.__dict__.get("_decode_tensors")
        if cached is None or cached[0] != _REGISTRATIONS[0]:
            tensors = [_parameters(layer, _ATTENTION_LAYER if k else _MAMBA_LAYER)
                       for layer, k in zip(self.model.layers, self.layer_kinds)]
            cached = self.__dict__["_decode_tensors"] = (_REGISTRATIONS[0], tensors)
        return cached[1]

    def _native_decode(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                       positions: torch.Tensor, cache: InferenceCache) -> torch.Tensor | None:
        """The layers' output, or None when their tensors do not suit the native step."""
        b, cfg, layers, kinds = x.shape[0], self.config, self.model.layers, self.layer_kinds
        storage, slots, kv = [], None, decode_ops.KVLayout(0, 0)
        for i, attention in enumerate(kinds):
            if attention:
                keys, values, kv = cache.kv_pages(i)
                storage.append(decode_ops.LayerStorage(keys, values))
            else:
                conv, ssm, slots = cache.mamba_pools(i)
                storage.append(decode_ops.LayerStorage(conv, ssm))
        write_rows, read_rows = cache.token_rows(positions) if any(kinds) else \
            (positions[:, 0], positions)
        cos, sin = (t.view(b, -1) for t in rope) if rope is not None else (x, x)
        rows = decode_ops.StepRows(_arange(b) if slots is None else slots, positions[:, 0],
                                   cos, sin, write_rows, read_rows)
        mamba, attention = self.kind_dims[False], self.kind_dims[True]
        out = decode_ops.decode_layers(
            x.view(b, -1), self._layer_tensors(), kinds, storage, rows, mamba or _NO_LAYER,
            attention or _NO_LAYER, kv, cfg.rms_norm_eps, cfg.time_step_limit)
        return None if out is None else out[:, None]

    def native_decode_rows(self) -> int:
        """The largest batch whose eager decode steps run every layer through bamba.native's
        layer steps (0 when they do not apply: no kernels, another device or dtype)."""
        fits = self.device.type == "cpu" and self._kinds_fit(self.dtype) and all(
            layer.input_layernorm.weight.dtype == self.dtype for layer in self.model.layers)
        return layer_ops.MAX_ROWS if fits else 0

    def save_pretrained(self, directory: str, **kwargs) -> None:
        """Write config.json + safetensors in the Hugging Face layout (see bamba.checkpoint)."""
        from bamba.checkpoint import save_pretrained

        save_pretrained(self, directory, **kwargs)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device


_NO_LAYER = layer_ops.LayerDims(*[0] * 9)  # the sizes of a kind of layer the model lacks

# Counts parameter, buffer and submodule registrations in any nn.Module (torch's global
# registration hooks): a model's cached parameter lists stay valid while it does not move.
_REGISTRATIONS = [0]


def _count_registration(*args) -> None:
    _REGISTRATIONS[0] += 1


for _register in (nn.modules.module.register_module_parameter_registration_hook,
                  nn.modules.module.register_module_buffer_registration_hook,
                  nn.modules.module.register_module_module_registration_hook):
    _register(_count_registration)


def _has_hooks(layers: nn.ModuleList) -> bool:
    """Whether a forward hook would see the decoder layers' calls (the fused decode skips them)."""
    return bool(nn.modules.module._global_forward_hooks or
                nn.modules.module._global_forward_pre_hooks or
                any(layer._forward_hooks or layer._forward_pre_hooks for layer in layers))


@functools.cache
def _arange(n: int) -> torch.Tensor:
    """0..n-1 (the rows of a batch whose state pools are in batch order), made once per n."""
    return torch.arange(n)


def _matmul_dtype(dtype: torch.dtype) -> torch.dtype:
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
        if name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight")):
            param.copy_(torch.randn(param.shape, generator=gen) * residual_std)
        elif leaf == "weight" and param.dim() == 2:
            param.copy_(torch.randn(param.shape, generator=gen) * std)
        elif "conv1d.weight" in name:
            bound = 1.0 / math.sqrt(param.shape[-1])
            param.copy_(torch.rand(param.shape, generator=gen) * 2 * bound - bound)
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
