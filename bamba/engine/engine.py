"""``LLM``: the offline API (``generate``) and the stepping API a server drives
(``add_request`` / ``step`` / ``abort``), over scheduler, memory manager and model runner.

One step: the scheduler picks chunks (ids and integers), the runner runs them on the pooled
tensors and returns last-position logits, ``bamba.sampling`` draws the next tokens, and the
engine detokenises, applies stop rules and releases the pages of every sequence that ends.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
from dataclasses import dataclass
from typing import Any

import torch

from bamba.compile import inductor_options
from bamba.config import with_rope_scaling
from bamba.dtypes import parse_dtype
from bamba.generation_defaults import AUTO, chosen_generation_defaults, stop_token_ids
from bamba.engine.lookup import Histories, drafters, lookup_from_config, lookup_step
from bamba.engine.page_pool import PagePool, plan_pools
from bamba.engine.params import RequestOutput, SamplingParams, TokenLogprob
from bamba.engine.prefix_cache import PrefixCache
from bamba.engine.prompts import encode_prompt, max_token_bytes
from bamba.engine.runner import ModelRunner
from bamba.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput, Sequence
from bamba.engine.structured import GrammarCompiler
from bamba.engine.sequence import SequenceOutput, sample_rows, token_logprobs
from bamba.model import BambaLM, cast
from bamba.native import steady_weights
from bamba.sampling import ParameterError

log = logging.getLogger(__name__)

# A step's tokens while sequences decode (``LLM(mixed_step_tokens="auto")``): 7 decoding rows
# beside a 9-token prompt chunk cost ~1.6x a step of the 7 alone on the bench hybrid
# (benchmarks/README.md#server).
MIXED_STEP_TOKENS = 16

@dataclass(frozen=True)
class EngineStats:
    """Counts for monitoring; 'free' pages include cached pages that may be evicted."""

    num_running: int
    num_waiting: int
    num_blocks: int
    num_free_blocks: int
    num_cached_blocks: int
    num_slots: int
    num_free_slots: int
    num_cached_slots: int
    block_bytes: int
    slot_bytes: int
    prefix_cache_hit_rate: float
    num_preemptions: int
    num_draft_tokens: int = 0  # prompt-lookup drafts checked, and how many were taken
    num_accepted_draft_tokens: int = 0


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[SequenceOutput]
    prompt_logprobs: list[TokenLogprob | None] | None = None  # the first sample computes them

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    def seqs_by_id(self, seq_id: int) -> SequenceOutput:
        return next(s for s in self.seqs if s.seq.seq_id == seq_id)

    def output(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt, self.prompt_ids,
                             [s.report() for s in self.seqs], self.finished,
                             self.prompt_logprobs if self.prompt_logprobs_done else None)

    @property
    def prompt_logprobs_done(self) -> bool:
        """Whether every prompt token has its entry (then the list no longer changes)."""
        return self.prompt_logprobs is not None and \
            len(self.prompt_logprobs) == len(self.prompt_ids)

    def record_prompt_logprobs(self, start: int, logits: torch.Tensor) -> None:
        """Fold in the logits [L, V] of prompt positions start.. (each predicts the next
        prompt token); positions already recorded (a recomputed chunk) are skipped."""
        assert self.prompt_logprobs is not None and self.params.prompt_logprobs is not None
        first = len(self.prompt_logprobs) - 1  # the position whose logits come next
        end = min(start + len(logits), len(self.prompt_ids) - 1)
        if end <= first or start > first:
            return
        self.prompt_logprobs.extend(token_logprobs(
            logits[first - start:end - start], self.prompt_ids[first + 1:end + 1],
            self.params.prompt_logprobs))


class LLM:
    """A continuously batching engine for one Bamba (or Llama-layout) model.

    model: a ``BambaLM``, or a checkpoint directory / hub id loaded with ``from_pretrained``
    (its tokenizer too). memory_gb: bytes (10^9) for KV blocks and state slots together.
    snapshot_interval: with prefix caching, Mamba states are saved every this many prompt
    tokens (rounded up to whole blocks) and at the prompt's last full block.
    rope_scaling: a ``rope_parameters`` dict replacing the model's RoPE scaling (its
    context grows with it; prefix caching is off for the length-dependent dynamic and longrope).
    compile_mode: None (eager) or a ``bamba.compile.MODES`` entry: decode steps run through
    one inductor-compiled graph for every batch size and context (the first decode step
    compiles it, about a minute on the reference CPU; inductor caches it on disk).
    mixed_step_tokens: while sequences decode, a step holds at most this many tokens (prompt
    chunks are cut to fit; the decoders alone may exceed it): a newcomer's prompt then runs
    beside the others' tokens in one native call over several steps instead of stalling them
    for a whole prefill pass. "auto": ``MIXED_STEP_TOKENS`` where that native call runs,
    else None (prompt chunks bounded by max_num_batched_tokens alone).
    generation_config: "auto" reads the checkpoint's generation_config.json (the model's
    ``generation_defaults``; see ``bamba.generation_defaults``): its sampling fields and
    max_new_tokens make ``get_default_sampling_params()``, what a request without params gets,
    and its eos_token_id ids every request stops at (unless ignore_eos); "none" ignores it; a
    directory or file path reads that one instead.
    speculative_config: vLLM's, for its n-gram method (prompt lookup, ``engine.lookup``):
    {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 3,
    "prompt_lookup_min": 1}; drafts are checked while every running sequence decodes (nothing
    waits), up to ``MAX_PASS_TOKENS`` rows a step in all.
    """

    def __init__(self, model: BambaLM | str | os.PathLike, tokenizer: object | None = None, *,
                 dtype: str | torch.dtype | None = None, memory_gb: float = 1.0,
                 block_size: int = 16, max_num_seqs: int = 32,
                 max_num_batched_tokens: int = 2048, enable_prefix_caching: bool = True,
                 state_dtype: str | torch.dtype = torch.float32, max_model_len: int | None = None,
                 snapshot_interval: int = 256, seed: int = 0, compile_mode: str | None = None,
                 rope_scaling: dict | None = None, mixed_step_tokens: int | str | None = "auto",
                 generation_config: str | os.PathLike = AUTO,
                 speculative_config: dict | None = None):
        if compile_mode is not None:
            inductor_options(compile_mode)  # a bad mode fails here, before the model loads
        self.lookup = lookup_from_config(speculative_config)  # bad values fail here too
        self.draft_tokens = self.accepted_draft_tokens = 0
        self.lookup_history = Histories()
        chosen = chosen_generation_defaults(generation_config)
        model, tokenizer = _load(model, tokenizer, dtype, rope_scaling)
        self.generation_defaults = chosen if chosen is not None else model.generation_defaults
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if not memory_gb > 0:
            raise ValueError(f"memory_gb must be positive, got {memory_gb}")
        cfg = model.config
        self.model, self.tokenizer, self.config = model, tokenizer, cfg
        self.state_dtype = parse_dtype(state_dtype, "state_dtype")
        wanted_len = min(max_model_len or cfg.context_length, cfg.context_length)
        if enable_prefix_caching and cfg.rope_spec.length_dependent:
            # Keys rotated for one prompt length are not those another length needs.
            log.info("engine: no prefix caching with rope_type %r (its frequencies depend on "
                     "the prompt's length)", cfg.rope_spec.rope_type)
            enable_prefix_caching = False
        plan = plan_pools(cfg, int(memory_gb * 1e9), block_size, model.dtype, self.state_dtype,
                          max_num_seqs, wanted_len, enable_prefix_caching,
                          spare_slots=0 if self.lookup is None else drafters(max_num_seqs))
        self.plan = plan
        # A lone sequence must always fit in the KV pool, or preemption could not help it.
        self.max_model_len = min(wanted_len, plan.num_blocks * block_size)
        token_bytes = None if tokenizer is None else max_token_bytes(tokenizer)
        self._prompt_byte_limit = None if token_bytes is None else token_bytes * self.max_model_len
        self.blocks = PagePool(plan.num_blocks, "KV block")
        self.slots = PagePool(plan.num_slots, "state slot")
        has_mamba = bool(cfg.mamba_layer_indices)
        self.prefix = PrefixCache(self.blocks, self.slots, block_size, has_mamba) \
            if enable_prefix_caching else None
        interval = math.ceil(snapshot_interval / block_size) * block_size
        self.runner = ModelRunner(model, plan, block_size, self.state_dtype, compile_mode)
        if isinstance(mixed_step_tokens, str):
            if mixed_step_tokens != "auto":
                raise ValueError(f"mixed_step_tokens must be 'auto', None or a count, got "
                                 f"{mixed_step_tokens!r}")
            mixed_step_tokens = MIXED_STEP_TOKENS \
                if self.runner.native_rows >= MIXED_STEP_TOKENS else None
        self.scheduler = Scheduler(self.blocks, self.slots, self.prefix, SchedulerConfig(
            block_size, max_num_seqs, max_num_batched_tokens, has_mamba, interval,
            mixed_step_tokens))
        self._requests: dict[str, _Request] = {}
        self._seq_owner: dict[int, _Request] = {}
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self._rng = random.Random(seed)
        self._grammars = None if tokenizer is None else \
            GrammarCompiler(tokenizer, cfg.vocab_size, self._eos_ids())
        log.info("engine: %d KV blocks x %d B, %d state slots x %d B, max_model_len %d",
                 plan.num_blocks, plan.block_bytes, plan.num_slots, plan.slot_bytes,
                 self.max_model_len)

    # ---- stepping API ------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a prompt (text or token ids); returns its request id. No params: the
        checkpoint's defaults (``get_default_sampling_params``)."""
        params = params if params is not None else self.get_default_sampling_params()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        text, ids = self.encode_prompt(prompt)
        if params.stop and self.tokenizer is None:
            raise ParameterError("stop strings need a tokenizer", "stop")
        params.check_token_ids_fit(self.config.vocab_size)
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        request_id = request_id if request_id is not None else str(next(self._request_ids))
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        eos = [] if params.ignore_eos else self._eos_ids()
        # a matcher each (a bad constraint fails here, before anything queues)
        matchers = [self.compile_structured_outputs(params) for _ in range(params.n)]
        request = _Request(request_id, text, ids, params, [])
        scoring = params.prompt_logprobs is not None
        if scoring:
            request.prompt_logprobs = [None]
        for index in range(params.n):
            seed = params.seed + index if params.seed is not None else self._rng.getrandbits(63)
            seq = Sequence(next(self._seq_ids), list(ids), len(ids),
                           prompt_logits=scoring and index == 0)
            request.seqs.append(SequenceOutput(seq, index, params, max_tokens, eos, seed,
                                               self.tokenizer, matchers[index]))
            self._seq_owner[seq.seq_id] = request
            self.scheduler.add(seq)
        self._requests[request_id] = request
        return request_id

    def encode_prompt(self, prompt: str | list[int],
                      param: str = "prompt") -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a prompt, checked as ``add_request`` checks it
        (``ParameterError`` naming ``param``); only reads, so any thread may call it."""
        return encode_prompt(prompt, self.tokenizer, self.config.vocab_size, self.max_model_len,
                             self._prompt_byte_limit, param)

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its memory; False if it is unknown or already finished."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return False
        for s in request.seqs:
            if not s.finished:
                s.finish("abort")
            self._drop(s.seq.seq_id)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; outputs of the requests that changed (finished ones last
        appear here, then are forgotten)."""
        changed = lookup_step(self) if self.lookup is not None else None
        if changed is None:
            out = self.scheduler.schedule()
            if not out.chunks:
                return []
            changed = self._run(out)
        outputs = []
        for request in changed:
            outputs.append(request.output())
            if request.finished:
                self._requests.pop(request.request_id, None)
        return outputs

    def _run(self, out: SchedulerOutput) -> list[_Request]:
        try:
            logits = self.runner.execute(out.chunks)
        except Exception:  # a failed step fails its sequences, never the engine
            log.exception("forward pass failed; failing %d sequences", len(out.chunks))
            self.scheduler.discard(out)
            return self._fail([c.seq_id for c in out.chunks])
        self.scheduler.update(out)
        starts = {c.seq_id: c.start for c in out.chunks}
        for seq_id, every in logits.every.items():
            self._seq_owner[seq_id].record_prompt_logprobs(starts[seq_id], every)
        changed: dict[str, _Request] = {}
        last = dict(logits.last)
        for seq_id in [i for i in last if self._seq_owner[i].seqs_by_id(i).max_tokens == 0]:
            del last[seq_id]  # scoring only: the prompt is done, nothing to generate
            owner = self._seq_owner[seq_id]
            owner.seqs_by_id(seq_id).finish("length")
            self._drop(seq_id)
            changed[owner.request_id] = owner
        if not last:
            return list(changed.values())
        owners = [self._seq_owner[i] for i in last]
        rows = [owner.seqs_by_id(i) for owner, i in zip(owners, last, strict=True)]
        drawn = sample_rows(rows, torch.stack(list(last.values())), self.config.vocab_size)
        failed = [s.seq.seq_id for s, d in zip(rows, drawn, strict=True)
                  if isinstance(d, Exception)]
        changed.update({r.request_id: r for r in self._fail(failed)})
        for owner, s, result in zip(owners, rows, drawn, strict=True):
            if isinstance(result, Exception):
                continue
            s.append(*result, self.max_model_len)
            if s.finished:
                self._drop(s.seq.seq_id)
            changed[owner.request_id] = owner
        return list(changed.values())

    def _fail(self, seq_ids: list[int]) -> list[_Request]:
        changed: dict[str, _Request] = {}
        for seq_id in seq_ids:
            request = self._seq_owner[seq_id]
            request.seqs_by_id(seq_id).finish("error")
            self._drop(seq_id)
            changed[request.request_id] = request
        return list(changed.values())

    def _drop(self, seq_id: int) -> None:
        self.scheduler.finish(seq_id)
        self._seq_owner.pop(seq_id, None)

    # ---- offline API -----------------------------------------------------------------------
    def generate(self, prompts: str | list[int] | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Complete every prompt; one finished ``RequestOutput`` per prompt, in order. No
        params: ``get_default_sampling_params()``."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if isinstance(params, list):
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        else:
            params = [params if params is not None else self.get_default_sampling_params()
                      ] * len(prompts)
        if any(p.output_kind != "cumulative" for p in params):
            raise ParameterError("generate returns whole outputs: output_kind must be "
                                 "'cumulative'", "output_kind")
        ids = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                ids.append(self.add_request(prompt, p))
        except ValueError:
            for request_id in ids:
                self.abort(request_id)
            raise
        finished: dict[str, RequestOutput] = {}
        with steady_weights():
            while len(finished) < len(ids):
                for output in self.step():
                    if output.finished:
                        finished[output.request_id] = output
                if not self.scheduler.has_work() and len(finished) < len(ids):
                    raise RuntimeError("engine idle with unfinished requests")
        return [finished[i] for i in ids]

    # ---- helpers ---------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_blocks=self.blocks.num_pages, num_free_blocks=self.blocks.num_free,
            num_cached_blocks=self.blocks.num_cached, num_slots=self.slots.num_pages,
            num_free_slots=self.slots.num_free, num_cached_slots=self.slots.num_cached,
            block_bytes=self.plan.block_bytes, slot_bytes=self.plan.slot_bytes,
            prefix_cache_hit_rate=self.prefix.hit_rate if self.prefix else 0.0,
            num_preemptions=self.scheduler.num_preemptions, num_draft_tokens=self.draft_tokens,
            num_accepted_draft_tokens=self.accepted_draft_tokens)

    def reset_prefix_cache(self) -> None:
        self.blocks.clear_cache()
        self.slots.clear_cache()

    def compile_structured_outputs(self, params: SamplingParams) -> Any:
        """A fresh matcher of ``params.structured_outputs`` (None without one); compiled once
        per constraint and cached, so a server compiles it off the engine's thread first.
        ParameterError when it does not compile or the model has no tokenizer."""
        if params.structured_outputs is None:
            return None
        if self._grammars is None:
            raise ParameterError("structured outputs need a tokenizer", "structured_outputs")
        return self._grammars.matcher(params.structured_outputs)

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the checkpoint's generation defaults where it sets them (vLLM's
        name); a caller's own values go on top of ``generation_defaults.sampling``."""
        defaults = self.generation_defaults
        length = {} if defaults.max_new_tokens is None else {"max_tokens": defaults.max_new_tokens}
        return SamplingParams(**defaults.sampling, **length)

    def _eos_ids(self) -> list[int]:
        return stop_token_ids(self.config, self.generation_defaults, self.tokenizer)


def _load(model: BambaLM | str | os.PathLike, tokenizer: object | None,
          dtype: str | torch.dtype | None, rope_scaling: dict | None
          ) -> tuple[BambaLM, object | None]:
    if isinstance(model, BambaLM):
        if dtype is not None:
            cast(model, parse_dtype(dtype))
        model.config = with_rope_scaling(model.config, rope_scaling)
        return model.eval(), tokenizer
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError(f"model must be a BambaLM or a checkpoint path/id, got {type(model)}")
    from bamba.checkpoint import from_pretrained, load_tokenizer

    loaded = from_pretrained(model, dtype=parse_dtype(dtype or torch.float32),
                             rope_scaling=rope_scaling)
    if tokenizer is None:
        tokenizer = load_tokenizer(model)
    return loaded, tokenizer

