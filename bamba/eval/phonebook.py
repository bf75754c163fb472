"""PhoneBook retrieval (Jelassi et al., 2024, "Repeat After Me"): can a model copy one number out
of a long context?

A prompt is a phone book, one ``"{full name}: {10-digit number}"`` line per person (names
unique), a blank line, two of its entries repeated as few-shot examples, and the queried
person's ``"{full name}:"``. The model continues greedily; its output is cut at the first
newline and stripped, and counts only if it equals the number exactly. Books are sized with the
model's tokenizer to just under a target prompt length, so accuracy can be read per length.

Generation and scoring are pure: ``make_samples`` takes an ``encode`` function and a seed,
``evaluate`` takes a ``complete`` function (the engine's, or any other).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bamba.eval.names import FAMILY_NAMES, GIVEN_NAMES

SHOTS = 2
MIN_ENTRIES = SHOTS + 1  # the queried person and two others for the few-shot lines
CAPACITY = len(GIVEN_NAMES) * len(FAMILY_NAMES)

Entry = tuple[str, str]  # (full name, number)
Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class PhoneBookSample:
    """One prompt: ``answer`` is the number of ``name``; ``depth`` where the queried line sits
    in the book (0 = first line, 1 = last)."""

    prompt: str
    prompt_ids: list[int]
    name: str
    answer: str
    entries: int
    depth: float

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


def _line(entry: Entry) -> str:
    return f"{entry[0]}: {entry[1]}"


def render_prompt(book: Sequence[Entry], shots: Sequence[Entry], query: str) -> str:
    """The prompt text: the book, a blank line, the few-shot lines, then ``"{query}:"``."""
    return "\n".join(map(_line, book)) + "\n\n" + "".join(_line(s) + "\n" for s in shots) \
        + f"{query}:"


class _EntryPool:
    """Entries drawn one by one from ``rng``: distinct names, 10-digit numbers. Entry i is the
    same however far the pool has been grown, so a search over book sizes stays reproducible."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.entries: list[Entry] = []
        self.taken: set[int] = set()

    def first(self, count: int) -> list[Entry]:
        assert count <= CAPACITY, count
        while len(self.entries) < count:
            person = self.rng.randrange(CAPACITY)
            if person in self.taken:
                continue
            self.taken.add(person)
            given, family = divmod(person, len(FAMILY_NAMES))
            number = str(self.rng.randrange(10**9, 10**10))
            self.entries.append((f"{GIVEN_NAMES[given]} {FAMILY_NAMES[family]}", number))
        return self.entries[:count]


def largest_fitting(count_at: Callable[[int], int], target: int, low: int, limit: int) -> int:
    """The largest n in [``low``, ``limit``) with ``count_at(n) <= target`` for a
    non-decreasing ``count_at`` (doubling, then bisection); ValueError when even ``low`` does
    not fit or ``limit`` still fits."""
    if count_at(low) > target:
        raise ValueError(f"a prompt of {target} tokens is too short for a phone book of {low} "
                         f"entries ({count_at(low)} tokens)")
    high = min(low * 2, limit)
    while count_at(high) <= target:
        if high == limit:
            raise ValueError(f"a phone book of {target} tokens needs more than the {limit} "
                             f"distinct names of the built-in list")
        low, high = high, min(high * 2, limit)
    while high - low > 1:
        middle = (low + high) // 2
        if count_at(middle) <= target:
            low = middle
        else:
            high = middle
    return low


def make_sample(target_tokens: int, encode: Encode, rng: random.Random) -> PhoneBookSample:
    """A prompt of at most ``target_tokens`` tokens, with as many entries as fit."""
    pool = _EntryPool(rng)

    def tokens(count: int) -> int:
        entries = pool.first(count)
        return len(encode(render_prompt(entries, entries[1:MIN_ENTRIES], entries[0][0])))

    count = largest_fitting(tokens, target_tokens, MIN_ENTRIES, CAPACITY)
    while True:  # the final order and picks differ from the search's: recount, drop if over
        book = pool.first(count)
        rng.shuffle(book)
        query, *shots = rng.sample(range(count), MIN_ENTRIES)
        prompt = render_prompt(book, [book[i] for i in shots], book[query][0])
        ids = encode(prompt)
        if len(ids) <= target_tokens or count == MIN_ENTRIES:
            break
        count -= 1
    if len(ids) > target_tokens:
        raise ValueError(f"a prompt of {target_tokens} tokens is too short for a phone book of "
                         f"{MIN_ENTRIES} entries ({len(ids)} tokens)")
    return PhoneBookSample(prompt, ids, book[query][0], book[query][1], count,
                           query / max(count - 1, 1))


def make_samples(target_tokens: int, samples: int, encode: Encode, seed: int
                 ) -> list[PhoneBookSample]:
    """``samples`` prompts of at most ``target_tokens`` tokens; the same seed, length and
    tokenizer give the same prompts (each sample has its own generator)."""
    if target_tokens < 1:
        raise ValueError(f"a phone book length must be >= 1 token, got {target_tokens}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    seeds = (f"phonebook:{seed}:{target_tokens}:{n}" for n in range(samples))
    return [make_sample(target_tokens, encode, random.Random(s)) for s in seeds]


def extract_answer(output: str) -> str:
    """The model's answer: its output up to the first newline, stripped."""
    return output.split("\n", 1)[0].strip()


def is_correct(output: str, answer: str) -> bool:
    return extract_answer(output) == answer


def score(samples: Sequence[PhoneBookSample], outputs: Sequence[str], examples: int = 3
          ) -> dict[str, Any]:
    """Accuracy of ``outputs`` (one per sample) with the first ``examples`` shown."""
    if len(outputs) != len(samples):
        raise ValueError(f"got {len(outputs)} outputs for {len(samples)} samples")
    if not samples:
        raise ValueError("no samples to score")
    correct = [is_correct(o, s.answer) for s, o in zip(samples, outputs)]
    shown = [{"name": s.name, "answer": s.answer, "output": o[:200],
              "extracted": extract_answer(o), "correct": ok, "depth": round(s.depth, 4),
              "prompt_tokens": s.prompt_tokens}
             for s, o, ok in list(zip(samples, outputs, correct))[:examples]]
    return {"n": len(samples), "correct": sum(correct), "accuracy": sum(correct) / len(samples),
            "mean_prompt_tokens": statistics.fmean(s.prompt_tokens for s in samples),
            "entries": statistics.fmean(s.entries for s in samples), "examples": shown}


def evaluate(books: dict[int, list[PhoneBookSample]],
             complete: Callable[[list[PhoneBookSample]], list[str]], examples: int = 3
             ) -> list[dict[str, Any]]:
    """One result per target length of ``books`` (from ``make_samples``): its samples completed
    in one call, scored."""
    return [{"length": length, **score(batch, complete(batch), examples)}
            for length, batch in books.items()]


def engine_completer(llm: Any, max_new_tokens: int
                     ) -> Callable[[list[PhoneBookSample]], list[str]]:
    """``complete`` through a ``bamba.engine.LLM``: greedy, at most ``max_new_tokens``, stopped
    at the first newline; all prompts of a call go to the engine together (it batches them)."""
    from bamba.engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=["\n"])

    def complete(batch: list[PhoneBookSample]) -> list[str]:
        outputs = llm.generate([s.prompt_ids for s in batch], params)
        return [o.outputs[0].text for o in outputs]

    return complete
