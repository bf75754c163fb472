"""A bamba model as an lm-evaluation-harness model, registered as "bamba" (``--model bamba``).

``loglikelihood`` scores each continuation given its context (lm-eval's split of the joint
tokenization), ``loglikelihood_rolling`` a whole text in disjoint windows of the model's
context (each token scored once, the first window after the prefix token); both run batched
forwards (``bamba.eval.span_scores``: sorted by length, right-padded). ``generate_until``
hands every request to the engine at once (``bamba.engine.LLM``), which batches them.
Tokenization follows lm-eval's Hugging Face models: no special tokens unless
``add_bos_token``; an empty context is the BOS token (EOS when there is none).

This is the one module that imports ``lm_eval``.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import lm_eval.models  # noqa: F401  lm-eval's own models, before ours fills its registry
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from bamba.engine import LLM, SamplingParams
from bamba.eval.span_scores import score_spans
from bamba.serve.chat import DEFAULT_CHAT_TEMPLATE, render_chat

log = logging.getLogger(__name__)
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default
GEN_KWARGS = {"top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
              "frequency_penalty"}  # passed to SamplingParams as they are


@register_model("bamba")
class BambaEvalLM(TemplateLM):
    """lm-eval's model interface over a bamba engine.

    Give ``llm`` (an ``LLM``), or ``pretrained`` (a checkpoint directory or hub id) with the
    engine's options (``dtype``, ``memory_gb``, ``max_model_len``). ``batch_size``: rows of one
    scoring forward. ``seed``: sampling seed of generations with temperature > 0.
    """

    def __init__(self, pretrained: str | None = None, *, llm: LLM | None = None,
                 batch_size: int | str = 8, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 add_bos_token: bool = False, dtype: str | None = None, memory_gb: float = 2.0,
                 max_model_len: int | None = None, seed: int = 1234, **ignored: Any):
        super().__init__()
        if (llm is None) == (pretrained is None):
            raise ValueError("give the model as pretrained=DIR_OR_ID or llm=LLM, not both")
        if ignored:
            log.info("bamba lm-eval model: ignoring %s", ", ".join(sorted(ignored)))
        self.llm = llm if llm is not None else LLM(
            pretrained, dtype=dtype, memory_gb=memory_gb, max_model_len=max_model_len)
        if self.llm.tokenizer is None:
            raise ValueError("lm-eval needs the model's tokenizer; this checkpoint has none")
        self.tokenizer = self.llm.tokenizer
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")
        self.add_bos_token, self.seed = bool(add_bos_token), int(seed)
        self.max_length = self.llm.max_model_len
        self.name = str(pretrained or getattr(self.llm.model.config, "name_or_path", "bamba"))

    # ---- tokens -------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else self.llm.config.eos_token_ids[0]

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        special = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return list(self.tokenizer.encode(string, add_special_tokens=special))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # ---- scoring ------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any
                              ) -> list[tuple[float, bool]]:
        spans = []
        for _, context, continuation in requests:
            if not continuation:
                raise ValueError("lm-eval asked to score an empty continuation")
            tokens = (context + continuation)[-(self.max_length + 1):]
            first = len(tokens) - len(continuation)
            if first < 1:
                log.warning("a continuation of %d tokens exceeds the context of %d; its first "
                            "%d tokens are not scored", len(continuation), self.max_length,
                            1 - first)
            spans.append((tokens, max(first, 1)))
        scores = score_spans(self.llm.model, spans, self.batch_size, self.max_length)
        return [(s.logprob, s.greedy) for s in scores]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False
                              ) -> list[float]:
        spans, owners = [], []
        for index, (text,) in enumerate(r.args for r in requests):
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)
            for context, predicted in map(make_disjoint_window, windows):
                spans.append((context + predicted, len(context)))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, score in zip(owners, score_spans(self.llm.model, spans, self.batch_size,
                                                    self.max_length), strict=True):
            totals[owner] += score.logprob
        return totals

    # ---- generation ---------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        prompts, params = [], []
        for context, gen_kwargs in (r.args for r in requests):
            p = self.sampling_params(gen_kwargs)
            room = max(self.max_length - p.max_tokens, 1)
            prompts.append((self.tok_encode(context) or [self.prefix_token_id])[-room:])
            params.append(p)
        return [out.outputs[0].text for out in self.llm.generate(prompts, params)]

    def sampling_params(self, gen_kwargs: dict[str, Any]) -> SamplingParams:
        """lm-eval's generation arguments as the engine's: ``until`` stop strings,
        ``max_gen_toks``, ``temperature`` (greedy unless given; 1 when only ``do_sample``)."""
        kwargs = copy.deepcopy(gen_kwargs)
        until = kwargs.pop("until", None)
        stop = [until] if isinstance(until, str) else list(until or [])
        max_tokens = kwargs.pop("max_gen_toks", kwargs.pop("max_tokens", self.max_gen_toks))
        do_sample = kwargs.pop("do_sample", False)
        temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0))
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in GEN_KWARGS}
        if kwargs:
            log.warning("generation arguments ignored: %s", ", ".join(sorted(kwargs)))
        return SamplingParams(max_tokens=min(int(max_tokens), self.max_length - 1),
                              temperature=temperature, stop=[s for s in stop if s] or None,
                              seed=self.seed, **given)

    # ---- chat ---------------------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """The prompt ``bamba serve`` renders for these messages (the same template)."""
        return render_chat(self.tokenizer, chat_history)


def _positive_int(value: int | str, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number
