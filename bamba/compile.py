"""Optional compilation of the decode step with torch.compile (inductor), for batch-1 speed.

At batch 1 decode streams every weight once per token. Eager ``F.linear`` reaches ~8 GB/s on
the reference CPU; inductor with ``freezing`` (weights become constants, prepacked for the
matmul library) about twice that, and mode "max-autotune" (generated GEMM kernels) more, at
the price of a longer first compile (inductor caches compiled graphs on disk). Compiling also
removes the per-op Python overhead of 32 layers × ~30 small ops.

The compiled step has static shapes: a fixed batch and a fixed cache length. Attention reads
the whole preallocated key/value buffer and masks positions after the query (the position is
a tensor, so a new position does not recompile). The cache tensors are inputs of the compiled
graph, not constants, so any ``ContiguousCache`` of the same shape reuses it.

    decode = CompiledDecode(model, mode="default")
    logits = decode(tokens, positions, cache)   # tokens, positions [B, 1] -> logits [B, V]

Nothing here runs unless called: compilation stays opt-in and off in unit tests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from bamba.cache import ContiguousCache
from bamba.model import BambaLM

log = logging.getLogger(__name__)

MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")


class _StaticCache:
    """``InferenceCache`` over whole-batch cache tensors: states are updated in place and
    attention gets the full key/value buffers (the causal mask hides unwritten positions)."""

    def __init__(self, conv: dict[int, torch.Tensor], ssm: dict[int, torch.Tensor],
                 keys: dict[int, torch.Tensor], values: dict[int, torch.Tensor]):
        self.conv, self.ssm, self.keys, self.values = conv, ssm, keys, values

    def mamba_state(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conv[layer_idx], self.ssm[layer_idx]

    def set_mamba_state(self, layer_idx: int, conv: torch.Tensor, ssm: torch.Tensor) -> None:
        self.conv[layer_idx].copy_(conv)
        if ssm is not self.ssm[layer_idx]:  # the float32 step already updated it in place
            self.ssm[layer_idx].copy_(ssm)

    def update_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor,
                  positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        rows = torch.arange(keys.shape[0], device=keys.device)[:, None].expand_as(positions)
        keys.index_put_((rows, positions), k.to(keys.dtype))
        values.index_put_((rows, positions), v.to(values.dtype))
        return keys, values


class _DecodeStep(torch.nn.Module):
    """One token per row through the model; the module that gets compiled (compiling a module,
    not a function taking it, lets inductor freeze its parameters into constants)."""

    def __init__(self, model: BambaLM):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor,
                conv: dict[int, torch.Tensor], ssm: dict[int, torch.Tensor],
                keys: dict[int, torch.Tensor], values: dict[int, torch.Tensor]) -> torch.Tensor:
        cache = _StaticCache(conv, ssm, keys, values)
        return self.model(tokens, positions=positions, cache=cache)[:, -1]


def inductor_options(mode: str, freezing: bool = True) -> dict[str, object]:
    """torch.compile options for ``mode`` plus inductor's freezing (CPU: no CUDA graphs)."""
    if mode not in MODES:
        raise ValueError(f"compile mode {mode!r} is not one of {MODES}")
    options = {k: v for k, v in torch._inductor.list_mode_options(mode).items()
               if not k.startswith("triton.")}
    options["freezing"] = freezing
    return options


def _whole_batch(cache: ContiguousCache, batch: int) -> bool:
    """True when the cache has ``batch`` rows and is bound to all of them, in order."""
    pools = [*cache.conv.values(), *cache.keys.values()]
    rows = pools[0].shape[0] if pools else 0
    return rows == batch and cache.rows.tolist() == list(range(rows))


class CompiledDecode:
    """A compiled decode step for one model: ``decode(tokens, positions, cache)`` -> logits
    [B, V] for a ``ContiguousCache`` whose bound rows are all of its rows, in order.

    The first call for a new (batch, cache length, dtype) compiles; ``compile_seconds`` records
    the time spent in such calls. Call it under ``torch.inference_mode()`` or ``no_grad()``
    (freezing needs inference). The model's weights must not change afterwards (they are
    frozen into the compiled graph).
    """

    def __init__(self, model: BambaLM, mode: str = "default", freezing: bool = True):
        self.model, self.mode = model, mode
        self.options = inductor_options(mode, freezing)
        self._fn: Callable[..., torch.Tensor] = torch.compile(
            _DecodeStep(model), dynamic=False, fullgraph=True)
        self._shapes: set[tuple] = set()
        self.compile_seconds = 0.0

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor,
                 cache: ContiguousCache) -> torch.Tensor:
        if tokens.shape != positions.shape or tokens.dim() != 2 or tokens.shape[1] != 1:
            raise ValueError(f"tokens and positions must both be [batch, 1], got "
                             f"{tuple(tokens.shape)} and {tuple(positions.shape)}")
        if not _whole_batch(cache, tokens.shape[0]):
            raise ValueError("compiled decode needs the cache bound to all of its rows, in order")
        shape = (tokens.shape[0], cache.max_len, self.model.dtype, torch.is_inference_mode_enabled())
        first = shape not in self._shapes
        start = time.perf_counter()
        # Inductor reads freezing before torch.compile's own options apply: patch the config
        # around the call (compiling happens inside the first call for each shape).
        with torch._inductor.config.patch(self.options):
            logits = self._fn(tokens, positions, cache.conv, cache.ssm, cache.keys, cache.values)
        if first:
            self._shapes.add(shape)
            self.compile_seconds += time.perf_counter() - start
            log.info("compiled decode step (mode %s) for batch %d, cache length %d in %.1f s",
                     self.mode, shape[0], shape[1], time.perf_counter() - start)
        return logits
