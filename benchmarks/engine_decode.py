"""Decode-step cost at a given context length, on a cache filled with random values.

The cost of one decode step depends on the shapes it touches (batch, context length, dtypes),
not on the values in the KV cache or the Mamba states, so instead of prefilling s tokens we fill
the caches with random values of the right shape and dtype and time decode steps at position s
(each step writes KV at s and attends to positions 0..s; the Mamba states are updated in place).

Two paths:
* "engine": the engine's own ``ModelRunner.execute`` over its paged KV blocks and state slots
  (``LLM`` built with the model, pages allocated from its pools, one-token chunks). This is what
  ``LLM.step`` runs per step, minus scheduling, sampling and detokenisation (measured
  end to end by the ``batched`` sub-benchmark).
* "model": ``BambaLM`` called directly with a ``bamba.cache.ContiguousCache``.

Throughput of a whole generation is derived by integrating the step cost over the context with
the trapezoid rule over the measured context lengths (decode cost is affine in s, so a few
points suffice); prefill is not included.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bamba.analyze import (Precision, appendix_decode_speedup, appendix_shape, decode_cost,
                           decode_speedup)
from bamba.cache import ContiguousCache
from bamba.config import BambaConfig, llama_twin
from bamba.engine import LLM
from bamba.engine.page_pool import kv_bytes_per_block, state_bytes_per_slot
from bamba.engine.scheduler import ScheduledChunk
from bamba.model import BambaLM

BLOCK_SIZE = 16
FILL_NOTE = ("Decode steps are timed at each context length on caches filled with random values "
             "of the right shape and dtype (KV blocks, conv and SSM states) instead of a prefill: "
             "a decode step's cost depends on shapes, not values. Whole-generation figures "
             "integrate the measured step cost over context (trapezoid rule over the measured "
             "contexts; prefill excluded). Both models are loaded at once and, at each point, "
             "their repeats alternate (hybrid twin, twin hybrid, ...).")
StepFn = Callable[[int, int], None]  # (batch, context) -> runs one decode step


@dataclass(frozen=True)
class Timing:
    """How many steps per repeat, how many repeats (median taken), untimed warm-up steps."""

    steps: int = 2
    repeats: int = 3
    warmup: int = 1


def fill_(tensor: torch.Tensor, gen: torch.Generator, tile: int = 1 << 20) -> None:
    """Random normal values everywhere: ``tile`` values are generated once and copied along
    the flattened tensor (a full randn of several GB would take longer than the benchmark).
    Works whatever the pool layout (the runner's KV pages are head-major)."""
    flat = tensor.view(-1)
    values = torch.randn(min(flat.numel(), tile), generator=gen).to(tensor.dtype)
    for start in range(0, flat.numel(), values.numel()):
        end = min(flat.numel(), start + values.numel())
        flat[start:end].copy_(values[: end - start])


def _fill_states(conv: dict, ssm: dict, keys: dict, values: dict, gen: torch.Generator) -> None:
    for pool in (*conv.values(), *ssm.values(), *keys.values(), *values.values()):
        fill_(pool, gen)


def budget_gb(model: BambaLM, batch: int, context: int, state_dtype: torch.dtype,
              slots_per_seq: int = 1) -> float:
    """An engine memory budget holding ``batch`` sequences of ``context`` tokens: plan_pools
    gives state slots at most half the budget and the rest to KV blocks."""
    cfg = model.config
    block_bytes = kv_bytes_per_block(cfg, BLOCK_SIZE, model.dtype)
    slots = batch * slots_per_seq * state_bytes_per_slot(cfg, model.dtype, state_dtype)
    kv = batch * math.ceil((context + 1) / BLOCK_SIZE) * block_bytes
    return (max(2 * slots, slots + kv) + 4 * block_bytes) / 1e9


class EngineSteps:
    """Decode steps through the engine's ``ModelRunner`` over its paged pools, for any batch
    up to ``max_batch`` and any context below ``max_context`` (rows 0..b-1 are used)."""

    def __init__(self, model: BambaLM, max_batch: int, max_context: int,
                 state_dtype: torch.dtype, seed: int = 0):
        cfg = model.config
        blocks_per_row = math.ceil((max_context + 1) / BLOCK_SIZE)
        self.llm = LLM(model, memory_gb=budget_gb(model, max_batch, max_context, state_dtype),
                       block_size=BLOCK_SIZE,
                       max_num_seqs=max_batch, enable_prefix_caching=False,
                       state_dtype=state_dtype, max_model_len=blocks_per_row * BLOCK_SIZE)
        self.slots = self.llm.slots.allocate(max_batch)
        self.tables = [self.llm.blocks.allocate(blocks_per_row) for _ in range(max_batch)]
        assert self.slots is not None and all(t is not None for t in self.tables)
        runner = self.llm.runner
        _fill_states(runner.conv, runner.ssm, runner.keys, runner.values,
                     torch.Generator().manual_seed(seed))
        self.vocab = cfg.vocab_size

    def __call__(self, batch: int, context: int) -> None:
        blocks = math.ceil((context + 1) / BLOCK_SIZE)
        chunks = [ScheduledChunk(seq_id=j, token_ids=[(7 * j + context) % self.vocab],
                                 start=context, block_ids=self.tables[j][:blocks],
                                 slot=self.slots[j], reset_state=False, restore_from=None,
                                 snapshot_to=None, sample=True) for j in range(batch)]
        self.llm.runner.execute(chunks)


class ModelSteps:
    """Decode steps through ``BambaLM`` with a ``ContiguousCache`` of ``batch`` rows (one cache
    per batch size, built on first use)."""

    def __init__(self, model: BambaLM, max_context: int, state_dtype: torch.dtype, seed: int = 0):
        self.model, self.max_context, self.state_dtype = model, max_context, state_dtype
        self.caches: dict[int, ContiguousCache] = {}
        self.seed = seed

    def _cache(self, batch: int) -> ContiguousCache:
        if batch not in self.caches:
            self.caches.clear()  # one at a time: the twin's caches are gigabytes
            cache = ContiguousCache(self.model.config, batch, self.max_context + 1,
                                    self.model.dtype, self.state_dtype)
            _fill_states(cache.conv, cache.ssm, cache.keys, cache.values,
                         torch.Generator().manual_seed(self.seed))
            self.caches[batch] = cache
        return self.caches[batch]

    @torch.inference_mode()
    def __call__(self, batch: int, context: int) -> None:
        cache = self._cache(batch)
        tokens = torch.arange(batch).view(batch, 1) % self.model.config.vocab_size
        positions = torch.full((batch, 1), context, dtype=torch.long)
        self.model(tokens, positions=positions, cache=cache, logits_to_keep=1)


def time_alternating(steps: dict[str, StepFn], batch: int, context: int,
                     timing: Timing) -> dict[str, dict]:
    """Median over repeats of the mean step time (seconds) of each model at (batch, context),
    their repeats taken in alternation (A B, B A, ...) so that a change in the machine's speed
    during the point hits all alike."""
    for step in steps.values():
        for _ in range(timing.warmup):
            step(batch, context)
    means: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(timing.repeats):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            start = time.perf_counter()
            for _ in range(timing.steps):
                steps[name](batch, context)
            means[name].append((time.perf_counter() - start) / timing.steps)
    return {name: {"step_s": statistics.median(m), "repeat_step_s": m}
            for name, m in means.items()}


def trapezoid(xs: list[int], ys: list[float], end: int) -> float:
    """Integral of the piecewise-linear y(x) from xs[0] to ``end`` (a measured point)."""
    total = 0.0
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x1 > end:
            break
        total += (x1 - x0) * (y0 + y1) / 2
    return total


def predictions(cfg: BambaConfig, batch: int, context: int) -> dict:
    """bamba.analyze's predicted decode speed-up (twin over hybrid) at one point."""
    return {"exact_state_float32": decode_speedup(cfg, batch, context, Precision(state="float32")),
            "exact_state_bfloat16": decode_speedup(cfg, batch, context,
                                                   Precision(state="bfloat16")),
            "appendix": appendix_decode_speedup(appendix_shape(cfg), batch, context)}


def predicted_generation_ratio(cfg: BambaConfig, batch: int, contexts: list[int], end: int,
                               state: str) -> float:
    """Twin/hybrid ratio of decode bytes integrated over the same contexts as the measurement."""
    precision = Precision(state=state)
    twin = [decode_cost(llama_twin(cfg), batch, s, precision).bytes for s in contexts]
    hybrid = [decode_cost(cfg, batch, s, precision).bytes for s in contexts]
    return trapezoid(contexts, twin, end) / trapezoid(contexts, hybrid, end)


def generation_rows(points: dict[str, dict[int, float]], cfg: BambaConfig, batch: int,
                    prompt: int, outputs: list[int], state: str) -> list[dict]:
    """Throughput and per-token latency of whole generations (prompt + n outputs), from the
    step cost integrated over context; ``points[model][context] = step seconds``."""
    contexts = sorted(points["hybrid"])
    rows = []
    for n in outputs:
        end = prompt + n
        if end not in contexts:
            continue
        row: dict = {"batch": batch, "prompt": prompt, "outputs": n}
        for name, steps in points.items():
            seconds = trapezoid(contexts, [steps[s] for s in contexts], end)
            row[name] = {"decode_seconds": seconds, "tok_s": batch * n / seconds,
                         "per_token_latency_ms": 1e3 * seconds / n}
        row["measured_ratio"] = row["hybrid"]["tok_s"] / row["twin"]["tok_s"]
        row["predicted_ratio"] = predicted_generation_ratio(cfg, batch, contexts, end, state)
        row["fraction_of_predicted"] = row["measured_ratio"] / row["predicted_ratio"]
        rows.append(row)
    return rows


def profile_step(step: StepFn, batch: int, context: int, top: int = 12) -> dict:
    """torch.profiler over two decode steps: the ops with the most self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    step(batch, context)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step(batch, context)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return {"batch": batch, "context": context, "steps": 2,
            "total_self_cpu_ms_per_step": total / 2e3,
            "top_ops": [{"op": e.key, "calls_per_step": e.count // 2,
                         "self_ms_per_step": e.self_cpu_time_total / 2e3,
                         "share": e.self_cpu_time_total / total} for e in events[:top]]}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
