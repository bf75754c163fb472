"""Batched next-token sampling over logits [B, V] with per-row parameters.

Order of operations (vLLM/OpenAI semantics):
  1. penalties on the raw logits — repetition (divide positive logits, multiply negative ones,
     for every token seen in prompt or output), presence (subtract once per token that occurred
     in the output) and frequency (subtract count * f);
  2. rows with temperature 0 take the argmax of the penalised logits (greedy);
  3. the other rows divide by their temperature, then keep the top_k tokens, then the smallest
     set of most likely tokens whose mass reaches top_p, then the tokens whose probability is at
     least min_p times the largest;
  4. one token per row is drawn by inverse-CDF sampling with one uniform number from that row's
     own ``torch.Generator``, so a seeded row draws the same tokens whatever else is in the batch.

Everything is vectorised over the batch and the vocabulary; the only Python loop is over rows to
draw one random number each from their generators. ``SamplingBatch`` holds the per-row
parameters as tensors and precomputes which filters any row uses, so a decode step that needs
none of them does no sort.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

PerRow = float | int | Sequence[float] | Sequence[int] | torch.Tensor


class ParameterError(ValueError):
    """A request's value is refused: ``param`` names the field (OpenAI's error "param"),
    ``code`` is an optional machine-readable reason (e.g. "context_length_exceeded")."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def as_float32(value: float) -> float:
    """``value`` rounded to float32, as the sampling tensors hold it (inf when it overflows)."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def require_int(value: object, name: str, low: int) -> None:
    """ParameterError naming ``name`` unless value is an int (not a bool) >= low."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ParameterError(f"{name} must be an integer >= {low}, got {value!r}", name)


def require_number(value: object, name: str, low: float, high: float,
                   low_open: bool = False) -> None:
    """ParameterError naming ``name`` unless value is a finite number in [low, high] (or
    (low, high]), both as given and rounded to float32 (1e39 is finite only as a float64)."""

    def inside(v: float) -> bool:
        return math.isfinite(v) and (v > low if low_open else v >= low) and v <= high

    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    as_float = float(value) if ok and abs(value) < 1e308 else math.inf
    if not (ok and inside(as_float) and inside(as_float32(as_float))):
        bracket = "(" if low_open else "["
        raise ParameterError(f"{name} must be a finite number in {bracket}{low}, {high}] "
                             f"(float32), got {value!r}", name)


# Bounds that keep the float32 sampling arithmetic finite: logits divided by a temperature below
# MIN_TEMPERATURE (other than 0, greedy) or scaled by a repetition penalty outside
# [1 / MAX_PENALTY_SCALE, MAX_PENALTY_SCALE] can overflow to inf and turn a row into NaNs.
MIN_TEMPERATURE = 1e-4
MAX_PENALTY_SCALE = 1e4


@dataclass
class SamplingValues:
    """What shapes a row's next-token distribution, with the one set of rules for its values
    (``generate``'s GenerationConfig and the engine's SamplingParams both extend it).
    temperature 0 is greedy; top_k 0, top_p 1 and min_p 0 switch those filters off; penalties
    at their neutral values (1, 0, 0) do nothing. The token rules (``restrict_logits``):
    ``logit_bias`` ({token id: bias in [-100, 100]}) is added to the logits first;
    ``allowed_token_ids`` keeps the row to those tokens; ``min_tokens``: no EOS, stop token or
    stop string ends the output before it has that many tokens (vLLM's rules)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    min_tokens: int = 0

    def check_sampling_values(self) -> None:
        """ParameterError naming the first value out of its range."""
        require_number(self.temperature, "temperature", 0.0, math.inf)
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise ParameterError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}, "
                                 f"got {self.temperature!r}", "temperature")
        require_int(self.top_k, "top_k", 0)
        require_number(self.top_p, "top_p", 0.0, 1.0, low_open=True)
        require_number(self.min_p, "min_p", 0.0, 1.0)
        require_number(self.repetition_penalty, "repetition_penalty", 1 / MAX_PENALTY_SCALE,
                       MAX_PENALTY_SCALE)
        require_number(self.presence_penalty, "presence_penalty", -2.0, 2.0)
        require_number(self.frequency_penalty, "frequency_penalty", -2.0, 2.0)
        if self.logit_bias is not None:
            self.logit_bias = check_logit_bias(self.logit_bias)
        require_int(self.min_tokens, "min_tokens", 0)
        if self.allowed_token_ids is not None:
            if not isinstance(self.allowed_token_ids, (list, tuple)) or \
                    not self.allowed_token_ids:
                raise ParameterError("allowed_token_ids must be a non-empty list of token ids",
                                     "allowed_token_ids")
            for token in self.allowed_token_ids:
                require_int(token, "allowed_token_ids entry", 0)
            self.allowed_token_ids = list(self.allowed_token_ids)

    def check_token_ids_fit(self, vocab_size: int) -> None:
        """ParameterError naming the token rule whose token id lies past the vocabulary."""
        for name in ("logit_bias", "allowed_token_ids"):
            outside = [t for t in getattr(self, name) or () if t >= vocab_size]
            if outside:
                raise ParameterError(f"{name}: token id {outside[0]} is outside the vocabulary "
                                     f"({vocab_size} tokens)", name)

    def check_min_tokens(self, max_tokens: int | None, name: str) -> None:
        """ParameterError when min_tokens exceeds the length limit (``name``)."""
        if max_tokens is not None and self.min_tokens > max_tokens:
            raise ParameterError(f"min_tokens ({self.min_tokens}) must not exceed {name} "
                                 f"({max_tokens})", "min_tokens")


def make_generators(seeds: Sequence[int | None]) -> list[torch.Generator | None]:
    """One CPU generator per seed (None: the row draws from torch's global generator)."""
    return [None if s is None else torch.Generator().manual_seed(int(s)) for s in seeds]


def _per_row(value: PerRow, rows: int, name: str, dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=dtype)
    if tensor.dim() == 0:
        return tensor.expand(rows).clone()
    if tensor.shape != (rows,):
        raise ValueError(f"{name} must be a scalar or have one value per row ({rows}), "
                         f"got shape {tuple(tensor.shape)}")
    return tensor.clone()


def _check(ok: torch.Tensor, name: str, rule: str, values: torch.Tensor) -> None:
    if not bool(ok.all()):
        raise ValueError(f"{name} must be {rule}, got {values[~ok][0].item()}")


@dataclass
class SamplingBatch:
    """Per-row sampling parameters of one batch (tensors [B] on the CPU, and a generator per row).

    Neutral values switch a filter off: temperature 0 = greedy, top_k 0, top_p 1, min_p 0,
    repetition_penalty 1, presence/frequency_penalty 0.
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    repetition_penalty: torch.Tensor
    presence_penalty: torch.Tensor
    frequency_penalty: torch.Tensor
    generators: list[torch.Generator | None]
    # which stages any row needs (computed once, so a step skips unused work without syncing)
    all_greedy: bool = field(init=False)
    any_greedy: bool = field(init=False)
    any_top_k: bool = field(init=False)
    any_top_p: bool = field(init=False)
    any_min_p: bool = field(init=False)
    any_penalty: bool = field(init=False)

    @classmethod
    def build(cls, rows: int, *, temperature: PerRow = 1.0, top_k: PerRow = 0,
              top_p: PerRow = 1.0, min_p: PerRow = 0.0, repetition_penalty: PerRow = 1.0,
              presence_penalty: PerRow = 0.0, frequency_penalty: PerRow = 0.0,
              seeds: Sequence[int | None] | None = None,
              generators: Sequence[torch.Generator | None] | None = None) -> "SamplingBatch":
        """Broadcast scalars to rows, validate, and make a generator per seed."""
        if rows <= 0:
            raise ValueError(f"a sampling batch needs at least one row, got {rows}")
        if seeds is not None and generators is not None:
            raise ValueError("give seeds or generators, not both")
        if generators is None:
            generators = make_generators(seeds if seeds is not None else [None] * rows)
        if len(generators) != rows:
            raise ValueError(f"need one seed/generator per row ({rows}), got {len(generators)}")
        f32 = torch.float32
        return cls(_per_row(temperature, rows, "temperature", f32),
                   _per_row(top_k, rows, "top_k", torch.long),
                   _per_row(top_p, rows, "top_p", f32), _per_row(min_p, rows, "min_p", f32),
                   _per_row(repetition_penalty, rows, "repetition_penalty", f32),
                   _per_row(presence_penalty, rows, "presence_penalty", f32),
                   _per_row(frequency_penalty, rows, "frequency_penalty", f32), list(generators))

    def __post_init__(self) -> None:
        t, k, p, m, r = (self.temperature, self.top_k, self.top_p, self.min_p,
                         self.repetition_penalty)
        _check(torch.isfinite(t) & (t >= 0), "temperature", "finite and >= 0", t)
        _check(k >= 0, "top_k", ">= 0 (0 = off)", k)
        _check((p > 0) & (p <= 1), "top_p", "in (0, 1]", p)
        _check((m >= 0) & (m <= 1), "min_p", "in [0, 1]", m)
        _check(torch.isfinite(r) & (r > 0), "repetition_penalty", "finite and > 0", r)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(torch.isfinite(value), name, "finite", value)
        greedy = t == 0
        self.all_greedy, self.any_greedy = bool(greedy.all()), bool(greedy.any())
        sampled = ~greedy
        self.any_top_k = bool((sampled & (k > 0)).any())
        self.any_top_p = bool((sampled & (p < 1)).any())
        self.any_min_p = bool((sampled & (m > 0)).any())
        self.any_penalty = bool((r != 1).any() or (self.presence_penalty != 0).any()
                                or (self.frequency_penalty != 0).any())

    def __len__(self) -> int:
        return len(self.generators)

    def select(self, rows: Sequence[int]) -> "SamplingBatch":
        """The sub-batch of these rows (generators are shared, not copied)."""
        index = torch.as_tensor(list(rows), dtype=torch.long)
        return SamplingBatch(self.temperature[index], self.top_k[index], self.top_p[index],
                             self.min_p[index], self.repetition_penalty[index],
                             self.presence_penalty[index], self.frequency_penalty[index],
                             [self.generators[i] for i in rows])


# ---- penalties ---------------------------------------------------------------------------------
def token_counts(token_ids: Sequence[Sequence[int]], vocab_size: int,
                 device: str | torch.device = "cpu") -> torch.Tensor:
    """How often each token occurs in each row: [B, V] float32 (rows may differ in length)."""
    counts = torch.zeros(len(token_ids), vocab_size, dtype=torch.float32, device=device)
    lengths = [len(ids) for ids in token_ids]
    if sum(lengths) == 0:
        return counts
    flat = torch.tensor([t for ids in token_ids for t in ids], dtype=torch.long, device=device)
    if int(flat.min()) < 0 or int(flat.max()) >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got {int(flat.min())}.."
                         f"{int(flat.max())}")
    rows = torch.repeat_interleave(torch.arange(len(token_ids), device=device),
                                   torch.tensor(lengths, device=device))
    counts.index_put_((rows, flat), torch.ones_like(flat, dtype=torch.float32), accumulate=True)
    return counts


def apply_penalties(logits: torch.Tensor, output_counts: torch.Tensor,
                    repetition: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor,
                    seen: torch.Tensor | None = None) -> torch.Tensor:
    """Penalised copy of logits [B, V].

    output_counts [B, V]: occurrences of each token in the generated output (presence and
    frequency penalties). seen [B, V] bool: tokens of prompt or output (repetition penalty);
    defaults to output_counts > 0. repetition/presence/frequency: [B].
    """
    if seen is None:
        seen = output_counts > 0
    r = repetition.to(logits.device, logits.dtype)[:, None]
    scaled = torch.where(logits > 0, logits / r, logits * r)
    out = torch.where(seen, scaled, logits)
    out = out - presence.to(logits.device, logits.dtype)[:, None] * (output_counts > 0)
    return out - frequency.to(logits.device, logits.dtype)[:, None] * output_counts


# ---- filters -----------------------------------------------------------------------------------
def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Divide each row by its temperature (rows with temperature 0 are left unchanged)."""
    t = temperature.to(logits.device, logits.dtype)
    return logits / torch.where(t > 0, t, torch.ones_like(t))[:, None]


# A full sort of the vocabulary is by far the dearest step (rows x vocab log vocab),
# so top_p first looks among the most likely TOP_P_CANDIDATES tokens (a partial top-k) and sorts
# the whole row only when the nucleus does not end among them.
TOP_P_CANDIDATES = 256


def _sorted_drop(sorted_logits: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor,
                 log_norm: torch.Tensor) -> torch.Tensor:
    """Drop mask over tokens in descending order: rank >= k, then outside the nucleus of mass
    top_p under the softmax whose log-normaliser is ``log_norm`` [B]."""
    rank = torch.arange(sorted_logits.shape[-1], device=sorted_logits.device)
    drop = rank[None, :] >= k[:, None]
    probs = (sorted_logits.masked_fill(drop, -math.inf) - log_norm[:, None]).exp()
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
    nucleus_done = mass_before >= top_p.to(probs.device, probs.dtype)[:, None]
    nucleus_done[:, 0] = False  # the most likely token always stays
    return drop | nucleus_done


def _filter_by_rank(logits: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor,
                    candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Filter using the ``candidates`` most likely tokens; also return which rows that decided
    exactly (their top_k lies among the candidates, or their nucleus ends there)."""
    values, index = logits.topk(candidates, dim=-1)  # sorted, most likely first
    decided = k <= candidates
    rank = torch.arange(candidates, device=logits.device)
    # a top_k beyond the candidates keeps the whole row, so normalise over the whole row
    log_norm = torch.where(decided, values.masked_fill(rank[None, :] >= k[:, None], -math.inf)
                           .logsumexp(-1), logits.logsumexp(-1))
    drop = _sorted_drop(values, k, top_p, log_norm)
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, index, ~drop)
    return logits.masked_fill(~keep, -math.inf), decided | drop[:, -1]


def top_k_top_p_filter(logits: torch.Tensor, top_k: torch.Tensor | None,
                       top_p: torch.Tensor | None) -> torch.Tensor:
    """Set to -inf every token outside the row's top_k (0 = all) and then outside the smallest
    set of most likely tokens whose probability (renormalised after top_k) reaches top_p."""
    rows, vocab = logits.shape
    k = torch.full((rows,), vocab, dtype=torch.long) if top_k is None else \
        torch.where((top_k > 0) & (top_k < vocab), top_k, torch.full_like(top_k, vocab))
    p = torch.ones(rows) if top_p is None else top_p.float()
    k, p = k.to(logits.device), p.to(logits.device)
    active = (k < vocab) | (p < 1)
    if not bool(active.any()):
        return logits
    p = torch.where(p < 1, p, torch.full_like(p, math.inf))  # 1 = off, whatever the rounding
    wanted = [int(k[k < vocab].max())] if bool((k < vocab).any()) else []
    wanted += [TOP_P_CANDIDATES] if bool((p < 1).any()) else []
    sel = active.nonzero().squeeze(-1)
    out = logits.clone()
    out[sel], decided = _filter_by_rank(logits[sel], k[sel], p[sel], min(vocab, max(wanted)))
    if not bool(decided.all()):  # nucleus wider than the candidates: sort those rows fully
        rest = sel[~decided]
        out[rest], _ = _filter_by_rank(logits[rest], k[rest], p[rest], vocab)
    return out


def min_p_filter(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf tokens whose probability is below min_p times the row's largest probability
    (p_i >= m * p_max  <=>  logit_i >= max_logit + log m)."""
    m = min_p.to(logits.device, logits.dtype)[:, None]
    threshold = logits.max(dim=-1, keepdim=True).values + torch.log(m)
    return logits.masked_fill(logits < threshold, -math.inf)


def filtered_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Temperature, top_k, top_p and min_p applied: the distribution the sampled rows draw from
    is softmax of the result (greedy rows are only left unscaled)."""
    logits = apply_temperature(logits, batch.temperature)
    if batch.any_top_k or batch.any_top_p:
        logits = top_k_top_p_filter(logits, batch.top_k if batch.any_top_k else None,
                                    batch.top_p if batch.any_top_p else None)
    if batch.any_min_p:
        logits = min_p_filter(logits, batch.min_p)
    return logits


# ---- drawing -----------------------------------------------------------------------------------
def uniforms(generators: Sequence[torch.Generator | None],
             skip: Sequence[bool] | None = None) -> torch.Tensor:
    """One number in (0, 1] per row, float64, each from its row's generator (None: torch's
    global one); rows marked in ``skip`` draw nothing and get 1.0."""
    skip = skip if skip is not None else [False] * len(generators)
    one = torch.ones((), dtype=torch.float64)
    draws = [one if s else 1.0 - torch.rand((), dtype=torch.float64, generator=g)
             for g, s in zip(generators, skip, strict=True)]
    return torch.stack(draws)


def sample_from_logits(logits: torch.Tensor, generators: Sequence[torch.Generator | None],
                       skip: Sequence[bool] | None = None) -> torch.Tensor:
    """Draw one token per row from softmax(logits) by inverse CDF: token ids [B] (long).

    With u in (0, 1], the first index whose cumulative mass reaches u * total always has
    positive probability, so -inf tokens are never drawn. Rows in ``skip`` consume no random
    number (their result is meaningless; callers replace it).
    """
    shifted = logits.float() - logits.float().max(dim=-1, keepdim=True).values
    # Probabilities below e^-80 (relative to the largest) become exact zeros: they would be
    # float32 denormals, which make the cumulative sum much slower, and cannot matter.
    probs = shifted.masked_fill_(shifted < -80.0, -math.inf).exp_()
    cdf = probs.cumsum(dim=-1)  # masked tokens add exact zeros: flat steps never drawn
    target = uniforms(generators, skip).to(logits.device, cdf.dtype) * cdf[:, -1]
    return torch.searchsorted(cdf, target[:, None]).squeeze(-1).clamp_(max=logits.shape[-1] - 1)


def sample(logits: torch.Tensor, batch: SamplingBatch, output_counts: torch.Tensor | None = None,
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """Next token per row ([B] long) from logits [B, V] (any float dtype).

    output_counts / seen: see ``apply_penalties``; needed only when a row has a penalty.
    """
    return choose(penalized_logits(logits, batch, output_counts, seen), batch)


def penalized_logits(logits: torch.Tensor, batch: SamplingBatch,
                     output_counts: torch.Tensor | None = None,
                     seen: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] as float32 with each row's penalties applied (``sample``'s first stage)."""
    if logits.dim() != 2 or logits.shape[0] != len(batch):
        raise ValueError(f"logits must be [{len(batch)}, vocab], got {tuple(logits.shape)}")
    logits = logits.float()
    if batch.any_penalty:
        if output_counts is None:
            raise ValueError("penalties need output_counts (token counts of each row's output)")
        logits = apply_penalties(logits, output_counts, batch.repetition_penalty,
                                 batch.presence_penalty, batch.frequency_penalty, seen)
    return logits


def choose(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Next token per row from penalised float32 logits: argmax for greedy rows, else a draw
    after temperature, top_k, top_p and min_p (``sample``'s second stage)."""
    if batch.all_greedy:
        return logits.argmax(dim=-1)
    greedy = batch.temperature == 0
    sampled = sample_from_logits(filtered_logits(logits, batch), batch.generators,
                                 greedy.tolist() if batch.any_greedy else None)
    if not batch.any_greedy:
        return sampled
    return torch.where(greedy.to(logits.device), logits.argmax(dim=-1), sampled)


def choose_against_draft(logits: torch.Tensor, batch: SamplingBatch, draft: int
                         ) -> tuple[int, bool]:
    """The token of one row ([1, V] penalised logits) at a position whose proposed token is
    ``draft``, and whether it is the draft. Greedy: the argmax. Sampled: the draft with
    probability p(draft), else a draw from p with the draft removed: speculative sampling for a
    draft that proposes one token for certain, so the token is distributed exactly as
    ``choose`` draws it."""
    if batch.all_greedy:
        token = int(logits.argmax(dim=-1))
        return token, token == draft
    filtered = filtered_logits(logits, batch)
    p_draft = float(torch.softmax(filtered, dim=-1)[0, draft])
    if float(uniforms(batch.generators)[0]) <= p_draft:  # u in (0, 1]: p(draft) = 1 always takes it
        return draft, True
    return int(sample_from_logits(filtered.index_fill(-1, torch.tensor([draft]), -math.inf),
                                  batch.generators)[0]), False


# ---- logit bias ---------------------------------------------------------------------------------
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: -100 bans a token, 100 all but forces it


def check_logit_bias(bias: object) -> dict[int, float]:
    """A {token id: bias} map as OpenAI takes it (ids as ints or their decimal strings,
    biases in [-100, 100]), with int keys; ParameterError naming what is wrong."""
    if not isinstance(bias, dict):
        raise ParameterError(f"logit_bias must map token ids to biases, got {bias!r}",
                             "logit_bias")
    out: dict[int, float] = {}
    for key, value in bias.items():
        token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else key
        require_int(token, "logit_bias token id", 0)
        require_number(value, f"logit_bias[{key}]", -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)
        out[token] = float(value)
    return out


def restrict_logits(logits: torch.Tensor, rows: Sequence[SamplingValues],
                    banned: Sequence[Sequence[int]]) -> torch.Tensor:
    """``logits`` [B, V] with each row's logit_bias added and -inf on what it may not take
    next: tokens outside its allowed_token_ids and its ``banned`` ids (those past V are
    ignored). The input itself when no row restricts anything."""
    out = apply_logit_bias(logits, [r.logit_bias for r in rows])
    vocab = out.shape[1]
    bans = [[t for t in ban if t < vocab] for ban in banned]
    if not any(bans) and all(r.allowed_token_ids is None for r in rows):
        return out
    keep = torch.ones(out.shape, dtype=torch.bool)
    for j, (row, ban) in enumerate(zip(rows, bans, strict=True)):
        if row.allowed_token_ids is not None:
            keep[j] = False
            keep[j, row.allowed_token_ids] = True
        keep[j, ban] = False
    return out.masked_fill(~keep, float("-inf"))


def apply_logit_bias(logits: torch.Tensor, biases: Sequence[dict[int, float] | None]
                     ) -> torch.Tensor:
    """``logits`` [B, V] with row i's ``biases[i]`` ({token id: bias}) added; the input itself
    when no row has one."""
    cells = [(row, token, value) for row, bias in enumerate(biases) if bias
             for token, value in bias.items()]
    if not cells:
        return logits
    rows, tokens, values = zip(*cells, strict=True)
    out = logits.clone()
    out.index_put_((torch.tensor(rows), torch.tensor(tokens)),
                   torch.tensor(values, dtype=logits.dtype), accumulate=True)
    return out


# ---- logprobs ----------------------------------------------------------------------------------
class Logprobs(NamedTuple):
    """Log-probabilities under the model's raw distribution (before penalties and filters)."""

    chosen: torch.Tensor  # [B] logprob of the sampled token
    top_ids: torch.Tensor  # [B, n] the n most likely tokens, most likely first
    top_logprobs: torch.Tensor  # [B, n]


def compute_logprobs(logits: torch.Tensor, chosen: torch.Tensor, top_n: int = 0) -> Logprobs:
    """Logprobs of the chosen tokens [B] and of the top_n tokens of each row."""
    if top_n < 0:
        raise ValueError(f"top_n must be >= 0, got {top_n}")
    logp = torch.log_softmax(logits.float(), dim=-1)
    top_logprobs, top_ids = logp.topk(min(top_n, logp.shape[-1]), dim=-1)
    return Logprobs(logp.gather(-1, chosen[:, None].to(logits.device)).squeeze(-1),
                    top_ids, top_logprobs)
