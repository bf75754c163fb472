"""Incremental detokenisation that never emits half of a multi-byte character, and stop strings.

Decoding tokens one at a time goes wrong in two ways: a character split over several byte
tokens decodes to U+FFFD until its last byte arrives, and tokenizers that merge a leading space
into a token (SentencePiece's "▁") decode a lone token differently from the same token in
context. So each step decodes a short window of recent tokens twice — up to the last emitted
token and up to the newest — and emits the difference, holding it back while it ends in U+FFFD.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5  # prompt tokens decoded as left context for the first output tokens


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Feed output tokens with ``add``; read the stable text so far in ``text``."""

    def __init__(self, tokenizer: Decoder, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0  # window start: decoded for context only
        self.read_offset = len(self.ids)  # tokens before this are already in ``text``
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes ("" while a character is partial)."""
        self.ids.append(token_id)
        window = self.ids[self.prefix_offset:]
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(window)
        if full.endswith(REPLACEMENT):
            return ""
        new = full[len(before):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.text += new
        return new

    def flush(self) -> str:
        """At the end: whatever is still held back (a truncated character stays U+FFFD)."""
        if self.read_offset == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new = self._decode(self.ids[self.prefix_offset:])[len(before):]
        self.read_offset = len(self.ids)
        self.text += new
        return new


def find_stop(text: str, stops: list[str], start: int) -> tuple[int, str] | None:
    """The earliest stop string that ends at or after ``start`` (where new text began):
    (its index in ``text``, the string), or None."""
    best: tuple[int, str] | None = None
    for stop in stops:
        index = text.find(stop, max(0, start - len(stop) + 1))
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    return best
