"""Inference engine for hybrids: continuous batching, KV blocks + state slots, chunked prefill,
prefix caching with state snapshots (see ``engine.LLM``); structured outputs
(``structured.StructuredOutputsParams``)."""

from bamba.engine.engine import LLM, EngineStats
from bamba.engine.params import CompletionOutput, RequestOutput, SamplingParams, TokenLogprob
from bamba.engine.structured import StructuredOutputsParams

__all__ = ["LLM", "EngineStats", "SamplingParams", "RequestOutput", "CompletionOutput",
           "TokenLogprob", "StructuredOutputsParams"]
