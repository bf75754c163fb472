"""Optional compilation of decode steps and fixed-length prefills with torch.compile (inductor).

At batch 1 decode streams every weight once per token. Inductor with ``freezing`` (weights
become constants, prepacked for the matmul library) streams them faster than eager
``F.linear``, and mode "max-autotune" (generated GEMM kernels) faster still, at the price of a
longer first compile (inductor caches compiled graphs on disk). Compiling also
removes the per-op Python overhead of 32 layers × ~30 small ops.

A compiled step has static shapes: a fixed batch, token count (1 for decode, the prompt
length for prefill) and cache length. Attention reads the whole preallocated key/value buffer
and masks positions after each query (positions are a tensor, so a new position does not
recompile). The cache tensors are inputs of the compiled graph, not constants, so any
``ContiguousCache`` of the same shape reuses it. For prefill, compiling fuses the scan's
elementwise work; each new prompt length compiles again, so it pays only for repeated lengths.

    step = CompiledForward(model, mode="default")
    logits = step(tokens, positions, cache)   # tokens, positions [B, L] -> last logits [B, V]

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

MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs")


class _StaticCache:
    """``InferenceCache`` over whole-batch cache tensors: states are updated in place and
    attention gets the full key/value buffers (the causal mask hides unwritten positions)."""

    def __init__(self, conv: dict[int, torch.Tensor], ssm: dict[int, torch.Tensor],
                 keys: dict[int, torch.Tensor], values: dict[int, torch.Tensor]):
        self.conv, self.ssm, self.keys, self.values = conv, ssm, keys, values

    def mamba_pools(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, None]:
        return self.conv[layer_idx], self.ssm[layer_idx], None

    def update_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor,
                  positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        rows = torch.arange(keys.shape[0], device=keys.device)[:, None].expand_as(positions)
        keys.index_put_((rows, positions), k.to(keys.dtype))
        values.index_put_((rows, positions), v.to(values.dtype))
        return keys, values


class _Step(torch.nn.Module):
    """Tokens through the model, logits of the last one: the module that gets compiled
    (compiling a module, not a function taking it, lets inductor freeze its parameters)."""

    def __init__(self, model: BambaLM):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor,
                conv: dict[int, torch.Tensor], ssm: dict[int, torch.Tensor],
                keys: dict[int, torch.Tensor], values: dict[int, torch.Tensor]) -> torch.Tensor:
        cache = _StaticCache(conv, ssm, keys, values)
        return self.model(tokens, positions=positions, cache=cache, logits_to_keep=1)[:, -1]


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


class CompiledModule:
    """``torch.compile`` of a module with inductor ``mode`` and freezing, patched around every
    call (inductor reads freezing before torch.compile's own options apply, and compiling
    happens inside the first call for each shape). ``dynamic`` as in ``torch.compile``.
    Call it under ``torch.inference_mode()`` or ``no_grad()`` (freezing needs inference); the
    module's weights must not change afterwards (they are frozen into the compiled graph)."""

    def __init__(self, module: torch.nn.Module, mode: str = "default", freezing: bool = True,
                 dynamic: bool = False):
        self.mode = mode
        self.options = inductor_options(mode, freezing)
        self._fn: Callable[..., torch.Tensor] = torch.compile(module, dynamic=dynamic,
                                                              fullgraph=True)

    def __call__(self, *args: object) -> torch.Tensor:
        with torch._inductor.config.patch(self.options):
            return self._fn(*args)


class CompiledForward:
    """Compiled forward passes for one model: ``step(tokens, positions, cache)`` -> the last
    position's logits [B, V], for tokens and positions [B, L] and a ``ContiguousCache`` bound
    to all of its rows, in order.

    The first call for a new (batch, length, cache length, dtype) compiles; ``compiles`` and
    ``compile_seconds`` record the time spent in such calls. Same usage rules as
    ``CompiledModule``.
    """

    def __init__(self, model: BambaLM, mode: str = "default", freezing: bool = True):
        self.model, self.mode = model, mode
        self._fn = CompiledModule(_Step(model), mode, freezing)
        self._shapes: set[tuple] = set()
        self.compiles: list[tuple[int, int, float]] = []  # (batch, length, seconds) per compile

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor,
                 cache: ContiguousCache) -> torch.Tensor:
        if tokens.shape != positions.shape or tokens.dim() != 2:
            raise ValueError(f"tokens and positions must both be [batch, length], got "
                             f"{tuple(tokens.shape)} and {tuple(positions.shape)}")
        if not _whole_batch(cache, tokens.shape[0]):
            raise ValueError("a compiled step needs the cache bound to all of its rows, in order")
        if int(positions.max()) >= cache.max_len:
            raise ValueError(f"position {int(positions.max())} is beyond the cache length "
                             f"{cache.max_len}")
        shape = (*tokens.shape, cache.max_len, self.model.dtype,
                 torch.is_inference_mode_enabled())
        first = shape not in self._shapes
        start = time.perf_counter()
        logits = self._fn(tokens, positions, cache.conv, cache.ssm, cache.keys, cache.values)
        if first:
            seconds = time.perf_counter() - start
            self._shapes.add(shape)
            self.compiles.append((shape[0], shape[1], seconds))
            log.info("compiled a step (mode %s) for batch %d, length %d, cache length %d "
                     "in %.1f s", self.mode, *shape[:3], seconds)
        return logits

    @property
    def compile_seconds(self) -> float:
        """Wall time of the calls that compiled (compiling plus one run)."""
        return sum(seconds for *_, seconds in self.compiles)


# The name bamba.generation's ``DecodeStep`` hook refers to: a CompiledForward serves it as is.
CompiledDecode = CompiledForward
