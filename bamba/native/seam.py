"""The seam between the torch model and the native kernels: ``accelerate(model)`` swaps a
``BambaLM``'s modules, in place, for subclasses whose kernel-seam methods (``bamba.model``) run
a native kernel when ``bamba.native.dispatch`` says it fits the call, and the torch reference
otherwise. Parameters, their names and the state dict stay as they are.

What each swapped module adds:

* ``nn.Linear``: the few-row (decode) linear kernel; ``kernel_weights()`` tells the layer and
  model steps its format and tensors;
* ``QuantizedLinear`` (fp8, int8, int4): the few-row kernel over its quantized weights, and at
  prefill a product over weight panels (int8, int4 against int8 activations; fp8 against bf16
  x) or dequantized tiles for torch's matmul; the layer and model steps read its
  ``kernel_weights()`` too;
* ``QuantizedEmbedding``: the lookup of the rows it reads in one call;
* ``RMSNorm`` and ``MLP``: one pass for the norm and the SwiGLU product;
* ``Attention``: decode attention over the cache in place;
* ``Mamba2Mixer``: the one-pass SSM state update, the prefill kernels, the training conv;
* ``DecoderLayer``: a decode token through the whole layer in one call (``layer_ops``);
* ``BambaLM``: a decode token through every layer in one call (``decode_ops``), from a plan of
  every layer's tensors that the model keeps and rebuilds after any of its modules registers a
  parameter, buffer, submodule or forward hook (the swapped modules count their registrations,
  and a hook's removal through its handle; nothing is hooked into torch).

The one-call steps skip the calls of the modules inside what they run, so they stand aside
while a forward hook sits on one of those modules: the hook then sees every call.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from bamba import model as reference
from bamba.cache_protocol import KVLayout
from bamba.native import attention_ops, decode_ops, dispatch, elementwise_ops, layer_ops, plan
from bamba.native import linear_ops, prefill_ops, quant_ops, ssd_ops, train_ops  # noqa: F401
from bamba.quant import embedding as quant_embedding
from bamba.quant import experts as quant_experts
from bamba.quant import linear as quant_linear
from bamba.native.plan import DENSE, LinearWeights
from bamba.ops import attention as attention_math
from bamba.ops.mixer import (MixerShape, MixerWeights, conv_silu, mamba_decode_step,
                             mamba_prefill, read_rows, ssd_pool_step, write_rows)

_REGISTRATIONS = [0]  # parameters, buffers, submodules registered in swapped modules


class _Counted(nn.Module):
    """Counts registrations, so a model's plan of tensors knows when to look again."""

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        if isinstance(value, (torch.Tensor, nn.Module)) or value is None:
            _REGISTRATIONS[0] += 1

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        _REGISTRATIONS[0] += 1

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        super().register_parameter(name, param)
        _REGISTRATIONS[0] += 1

    def register_buffer(self, name: str, tensor: torch.Tensor | None,
                        persistent: bool = True) -> None:
        super().register_buffer(name, tensor, persistent)
        _REGISTRATIONS[0] += 1

    def add_module(self, name: str, module: nn.Module | None) -> None:
        super().add_module(name, module)
        _REGISTRATIONS[0] += 1

    def register_forward_hook(self, *args, **kwargs) -> RemovableHandle:
        return _counted_handle(super().register_forward_hook(*args, **kwargs))

    def register_forward_pre_hook(self, *args, **kwargs) -> RemovableHandle:
        return _counted_handle(super().register_forward_pre_hook(*args, **kwargs))


class _CountedHandle(RemovableHandle):
    """A forward hook's handle whose removal counts as a registration (the one-call steps,
    which stood aside for the hook, look again)."""

    def remove(self) -> None:
        super().remove()
        _REGISTRATIONS[0] += 1


def _counted_handle(handle: RemovableHandle) -> RemovableHandle:
    _REGISTRATIONS[0] += 1
    handle.__class__ = _CountedHandle
    return handle


def _hooked(modules) -> bool:
    """Whether a forward hook sits on one of ``modules`` (read when a plan is built: adding or
    removing one on a swapped module makes the plan be built again)."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _stale(generation: int, hooked: bool, modules: Callable[[], Iterable[nn.Module]]) -> bool:
    """Whether a plan built at registrations count ``generation``, with a hook among
    ``modules()`` when ``hooked``, must be built again: the count moved, or the hooks are gone
    (one added before ``accelerate`` is removed through torch's own handle, which the count
    does not see; while hooked, each call looks again: the per-layer path runs then anyway)."""
    return generation != _REGISTRATIONS[0] or (hooked and not _hooked(modules()))


class Linear(_Counted, nn.Linear):
    """The few-row kernel streaming the weights (decode), the panel product for more bf16
    rows (prefill), torch's linear where neither fits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if dispatch.linear_fits(x, self.weight):
            if dispatch.through_dispatcher():
                return torch.ops.bamba.linear_rows(x, self.weight, self.bias)
            return linear_ops.call_rows(x, self.weight, self.bias)
        if dispatch.gemm_fits(x, self.weight):
            y = linear_ops.gemm_rows(x, self.weight, self.bias)
            if y is not None:
                return y
        return F.linear(x, self.weight, self.bias)

    def kernel_weights(self) -> LinearWeights:
        return LinearWeights(DENSE, self.weight, self.bias)


class QuantizedLinear(_Counted, quant_linear.QuantizedLinear):
    """The few-row kernel streaming the quantized weights (decode), a product over weight
    panels or dequantized tiles for torch's matmul (prefill), the torch reference where
    neither fits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _quantized_product(x, self.kernel_weights())
        return super().forward(x) if out is None else out


def _quantized_product(x: torch.Tensor, weights: LinearWeights) -> torch.Tensor | None:
    """x W^T (+ bias) of quantized ``weights`` by the kernels: the few-row one streaming them
    (decode), a product over weight panels or dequantized tiles (more rows); None where
    neither fits."""
    layout = dispatch.quant_linear_fits(x, weights)
    if layout is None:
        return None
    if x.numel() // x.shape[-1] <= dispatch.MAX_LINEAR_ROWS:
        return quant_ops.quant_linear_rows(x, layout, weights.bias, dispatch.through_dispatcher())
    return quant_ops.quant_linear_many(x, layout, weights.bias)


class Experts(_Counted, reference.Experts):
    """A mixture whose quantized experts' products run on the quantized kernels over each
    picked expert's slice (a prefill's rows; decode runs inside the layer steps)."""

    def product(self, stacked: nn.Module, rows: torch.Tensor, expert: int) -> torch.Tensor:
        if isinstance(stacked, quant_experts.QuantizedExpertWeights):
            out = _quantized_product(rows, stacked.expert_weights(expert))
            if out is not None:
                return out
        return super().product(stacked, rows, expert)


class QuantizedEmbedding(_Counted, quant_embedding.QuantizedEmbedding):
    """The lookup in one native call (~37 against ~115 us a decode token, glue included, with
    the caches cold from the weights' stream); the torch reference where it does not fit."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        layout = dispatch.quant_gather_fits(input_ids, self.kernel_weights(),
                                            self.embedding_dim, self.output_dtype)
        if layout is None:
            return super().forward(input_ids)
        return quant_ops.quant_gather(layout, input_ids, self.output_dtype)


class RMSNorm(_Counted, reference.RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if dispatch.elementwise_fits(x, self.weight):
            return elementwise_ops.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class MLP(_Counted, reference.MLP):
    def swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if dispatch.elementwise_fits(gate, up):
            return elementwise_ops.silu_mul(gate, up)
        return super().swiglu(gate, up)


class FusedMLP(MLP, reference.FusedMLP):
    """Granite's MLP with the SwiGLU kernel (``MLP.swiglu``)."""


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``matmul_attention`` over the cache in place where the kernel fits."""
    if dispatch.decode_attention_fits(q, k, v):
        return attention_ops.decode_attention(q, k, v, mask, scale)
    return attention_math.matmul_attention(q, k, v, mask, scale)


class Attention(_Counted, reference.Attention):
    def softmax_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          mask: torch.Tensor | None) -> torch.Tensor:
        return attention_math.attention(q, k, v, mask, decode_attention, self.scale)


def _ssd_pool_step(pool: torch.Tensor, rows: torch.Tensor | None, x: torch.Tensor,
                   dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor) -> torch.Tensor:
    """``ssd_pool_step`` in one pass over each state, in place, where the kernel fits."""
    if not dispatch.ssd_pool_fits(pool):
        return ssd_pool_step(pool, rows, x, dt, A, B, C)
    if rows is None:
        rows = torch.arange(x.shape[0], device=pool.device)
    return torch.ops.bamba.ssd_step_pool(pool, rows, x, dt, A, B, C)


def _conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               seq_idx: torch.Tensor | None) -> torch.Tensor:
    """The training conv + silu (forward and backward native) where the kernel fits."""
    if dispatch.conv_train_fits(x, weight):
        return torch.ops.bamba.conv_silu(x, weight, bias, seq_idx)
    return conv_silu(x, weight, bias, seq_idx)


def _prefill_kernel(zxbcdt: torch.Tensor, pools: tuple | None, w: MixerWeights,
                    shape: MixerShape, scan_chunk: int, matmul_dtype: torch.dtype) -> torch.Tensor:
    """``mamba_prefill`` in three native passes (``prefill_ops``); y in zxbcdt's dtype."""
    conv_pool, ssm_pool, rows = pools if pools is not None else (None, None, None)
    y, conv_state, ssm_state = torch.ops.bamba.mixer_prefill(
        zxbcdt, None if pools is None else read_rows(conv_pool, rows),
        None if pools is None else read_rows(ssm_pool, rows), *w,
        [shape.n_heads, shape.head_dim, shape.n_groups, shape.d_state, scan_chunk,
         int(matmul_dtype == torch.bfloat16)], [*shape.time_step_limit, shape.eps])
    if pools is not None:
        write_rows(conv_pool, rows, conv_state)
        write_rows(ssm_pool, rows, ssm_state)
    return y


def prefill_middle(zxbcdt: torch.Tensor, pools: tuple | None, w: MixerWeights,
                   shape: MixerShape, seq_idx: torch.Tensor | None, scan_chunk: int,
                   matmul_dtype: torch.dtype) -> torch.Tensor:
    """``bamba.ops.mixer.mamba_prefill`` with the kernels where they fit: the prefill kernels
    (y then in zxbcdt's dtype), or the training conv."""
    sizes = (shape.n_heads, shape.head_dim, shape.n_groups, shape.d_state)
    if dispatch.prefill_fits(zxbcdt, seq_idx, w, sizes):
        return _prefill_kernel(zxbcdt, pools, w, shape, scan_chunk, matmul_dtype)
    return mamba_prefill(zxbcdt, pools, w, shape, seq_idx, scan_chunk, matmul_dtype, _conv_silu)


class Mamba2Mixer(_Counted, reference.Mamba2Mixer):
    def decode_middle(self, zxbcdt: torch.Tensor, pools: tuple) -> torch.Tensor:
        return mamba_decode_step(zxbcdt, *pools, self.weights(), self.shape, _ssd_pool_step)

    def prefill_middle(self, zxbcdt: torch.Tensor, pools: tuple | None,
                       seq_idx: torch.Tensor | None) -> torch.Tensor:
        return prefill_middle(zxbcdt, pools, self.weights(), self.shape, seq_idx,
                              self.scan_chunk, reference.scan_matmul_dtype(zxbcdt.dtype))


class DecoderLayer(_Counted, reference.DecoderLayer):
    """One decode token through the whole layer in one native call (``layer_ops``)."""

    def forward(self, x: torch.Tensor, rope: reference.Rope, positions: torch.Tensor,
                cache: reference.InferenceCache | None,
                seq_idx: torch.Tensor | None) -> torch.Tensor:
        if cache is not None and dispatch.layer_step_fits(x, self.input_layernorm.weight.dtype,
                                                          self.step_dims):
            tensors = self.kernel_tensors()
            if self.layer_type == "mamba" and tensors.mamba is not None:
                return self._mamba_step(x, cache, tensors.mamba)
            if self.layer_type == "attention" and tensors.whole() is not None:
                return self._attention_step(x, rope, positions, cache, tensors)
        return super().forward(x, rope, positions, cache, seq_idx)

    @property
    def step_dims(self) -> dispatch.LayerDims:
        """The layer's sizes (and its experts' formats), read again after a registration in a
        swapped module (a module replaced by one of another format)."""
        cached = self.__dict__.get("_step_dims")
        if cached is None or cached[0] != _REGISTRATIONS[0]:
            cached = self.__dict__["_step_dims"] = (_REGISTRATIONS[0], plan.layer_dims(self))
        return cached[1]

    def kernel_tensors(self) -> plan.LayerTensors:
        """The layer's tensors, read again after a registration in a swapped module; none while
        a forward hook sits on a module inside the layer (the one call would skip its call)."""
        cached = self.__dict__.get("_kernel_tensors")
        if cached is None or _stale(cached[0], cached[1], self._modules_inside):
            hooked = _hooked(self._modules_inside())
            tensors = plan.LayerTensors(None, None, None) if hooked else plan.layer_tensors(self)
            cached = self.__dict__["_kernel_tensors"] = (_REGISTRATIONS[0], hooked, tensors)
        return cached[2]

    def _modules_inside(self) -> Iterator[nn.Module]:
        return itertools.islice(self.modules(), 1, None)

    def _attention_step(self, x: torch.Tensor, rope: reference.Rope, positions: torch.Tensor,
                        cache: reference.InferenceCache,
                        tensors: plan.LayerTensors) -> torch.Tensor:
        a, b, eps = self.self_attn, x.shape[0], self.input_layernorm.eps
        x = x.view(b, -1)
        qkv = layer_ops.attention_in_step(x, tensors.attention_in, self.step_dims, eps)
        kv_width = a.n_kv * a.head_dim
        q, k, v = qkv[:, None].split([a.n_heads * a.head_dim, kv_width, kv_width], dim=-1)
        attended = a.attend(q, k, v, rope, positions, cache, None)
        out = layer_ops.attention_out_step(x, attended.view(b, -1), tensors.attention_out,
                                           self.step_dims, eps, self.residual_multiplier)
        return out[:, None]

    def _mamba_step(self, x: torch.Tensor, cache: reference.InferenceCache,
                    tensors: list) -> torch.Tensor:
        m, b = self.mamba, x.shape[0]
        conv_pool, ssm_pool, rows = cache.mamba_pools(m.layer_idx)
        if rows is None:
            rows = _arange(b)
        out = layer_ops.mamba_layer_step(x.view(b, -1), conv_pool, ssm_pool, rows, tensors,
                                         self.step_dims, m.eps, m.time_step_limit,
                                         self.residual_multiplier)
        return out[:, None]


class NativeStepUnavailable(RuntimeError):
    """The one-call native step cannot run this call (raised before any state changes)."""


class BambaLM(_Counted, reference.BambaLM):
    """One decode token through every layer and the final norm in one native call
    (``decode_ops``): at batch 1 the per-layer Python and torch glue cost ~4 ms of a 16 ms
    step."""

    def layers_then_norm(self, x: torch.Tensor, rope: reference.Rope | None,
                         positions: torch.Tensor, cache: reference.InferenceCache | None,
                         seq_idx: torch.Tensor | None) -> torch.Tensor:
        if cache is not None:
            steps = self.decode_plan()
            if steps.tensors is not None and dispatch.decode_step_fits(x, cache, steps.dims):
                out = self._decode(x, rope, positions, cache, steps)
                if out is not None:
                    return out
            if getattr(cache, "rows_share_slots", False) or \
                    getattr(cache, "state_sources", None) is not None:
                raise NativeStepUnavailable("rows sharing a state slot or reading another "
                                            "slot's state need the native step")
        return super().layers_then_norm(x, rope, positions, cache, seq_idx)

    def decode_plan(self) -> plan.DecodePlan:
        """Every layer's tensors, looked up again only after a registration in a swapped
        module, or once the hooks that kept the step aside are gone (the walk costs ~0.4 ms a
        token with the caches cold from streaming the weights). Tensors replaced in place
        (``.data``, ``.to``) keep their Parameter objects; decode_ops sees their new addresses
        (the plan's memo compares them on every token and rebuilds the step's C structs when
        one moved)."""
        cached = self.__dict__.get("_decode_plan")
        if cached is None or _stale(cached[0].generation, cached[1], self._modules_stepped):
            norm, layers = self.model.final_layernorm, self.model.layers
            hooked, norm_hooked = _hooked(layers.modules()), _hooked([norm])
            steps = plan.DecodePlan.build(
                layers, norm if type(norm) is RMSNorm and not norm_hooked else None,
                _REGISTRATIONS[0], hooked=hooked)
            cached = self.__dict__["_decode_plan"] = (steps, hooked or norm_hooked)
        return cached[0]

    def _modules_stepped(self) -> Iterator[nn.Module]:
        """The modules whose calls the whole-model step stands in for."""
        return itertools.chain(self.model.layers.modules(), [self.model.final_layernorm])

    def _decode(self, x: torch.Tensor, rope: reference.Rope | None, positions: torch.Tensor,
                cache: reference.InferenceCache, steps: plan.DecodePlan) -> torch.Tensor | None:
        """The layers' output after the final norm, or None when their tensors do not suit
        the native step. The norm runs in the same call unless a hook or a dtype of its own
        asks for its module."""
        b, cfg = x.shape[0], self.config
        storage, slots, kv = [], None, KVLayout(0, 0)
        for i, attention in enumerate(steps.kinds):
            if attention:
                keys, values, kv = cache.kv_pages(i)
                storage.append(decode_ops.LayerStorage(keys, values))
            else:
                conv, ssm, slots = cache.mamba_pools(i)
                storage.append(decode_ops.LayerStorage(conv, ssm))
        write_rows, read_rows = cache.token_rows(positions) if any(steps.kinds) else \
            (positions[:, 0], positions)
        cos, sin = (t.view(b, -1) for t in rope) if rope is not None else \
            (x.new_empty(b, 0),) * 2  # no rotary positions (Granite's "nope")
        rows = decode_ops.StepRows(_arange(b) if slots is None else slots, positions[:, 0],
                                   cos, sin, write_rows, read_rows,
                                   getattr(cache, "state_sources", None))
        mamba, attention = steps.dims
        norm, final = self.model.final_layernorm, steps.final_norm
        if final is not None and final.weight.dtype != x.dtype:
            final = None
        out = decode_ops.decode_layers(
            x.view(b, -1), steps.tensors, steps.kinds, storage, rows, mamba or plan.NO_LAYER,
            attention or plan.NO_LAYER, kv, cfg.rms_norm_eps, cfg.time_step_limit, steps.memo,
            final, decode_ops.Multipliers(cfg.residual_multiplier, cfg.attention_multiplier),
            steps.expert_formats)
        if out is None:
            return None
        return out[:, None] if final is not None else norm(out[:, None])


@functools.cache
def _arange(n: int) -> torch.Tensor:
    """0..n-1 (the rows of a batch whose state pools are in batch order), made once per n."""
    return torch.arange(n)


def _counted(cls: type[nn.Module]) -> type[nn.Module]:
    return type(cls.__name__, (_Counted, cls), {"__module__": __name__})


# The exact class of each module a BambaLM holds -> its swapped class.
SWAPS: dict[type, type] = {
    nn.Linear: Linear, quant_linear.QuantizedLinear: QuantizedLinear,
    quant_embedding.QuantizedEmbedding: QuantizedEmbedding,
    reference.RMSNorm: RMSNorm, reference.MLP: MLP, reference.FusedMLP: FusedMLP,
    reference.Experts: Experts,
    reference.Attention: Attention, reference.Mamba2Mixer: Mamba2Mixer,
    reference.DecoderLayer: DecoderLayer, reference.BambaLM: BambaLM,
    **{cls: _counted(cls) for cls in (nn.Conv1d, nn.Embedding, nn.ModuleList,
                                      reference.Backbone, reference.Router,
                                      reference.ExpertWeights,
                                      quant_experts.QuantizedExpertWeights)},
}
_SWAPPED = frozenset(SWAPS.values())


def accelerate(model: reference.BambaLM) -> reference.BambaLM:
    """Install the native kernels on ``model`` in place and return it (a no-op the second
    time). Modules of other classes (a subclass of the user's, a wrapper) stay as they are."""
    for module in model.modules():
        swapped = SWAPS.get(type(module))
        if swapped is not None:
            module.__class__ = swapped
    _REGISTRATIONS[0] += 1
    return model


def is_accelerated(model: nn.Module) -> bool:
    return type(model) in _SWAPPED


def decode_rows(model: reference.BambaLM) -> int:
    """The largest batch whose eager decode steps run every layer in one native call (0 when
    they do not apply: a model not accelerated, no kernels, another device or dtype)."""
    if not isinstance(model, BambaLM):
        return 0
    steps = model.decode_plan()
    return dispatch.decode_rows(model.dtype, model.device, steps.dims,
                                [layer.input_layernorm.weight.dtype for layer in model.model.layers]
                                ) if steps.tensors is not None else 0
