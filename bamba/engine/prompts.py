"""The checks a prompt passes before the engine takes it: text is valid Unicode and not so long
that it cannot fit (refused before tokenizing, when the tokenizer bounds the bytes a token
covers), token ids lie in the vocabulary, and the prompt leaves room for one generated token.

Every refusal is a ``ParameterError`` naming the field, so a server answers it as a 400 as is.
"""

from __future__ import annotations

from typing import Any

from bamba.sampling import ParameterError

CONTEXT_EXCEEDED = "context_length_exceeded"
MAX_CHAR_BYTES = 4  # an unknown character becomes one unknown token; UTF-8 needs <= 4 bytes


def max_token_bytes(tokenizer: Any) -> int | None:
    """The most bytes of UTF-8 text one token can stand for, or None when unknown.

    Known for a BPE without a normalizer: every token is a vocabulary entry, and an entry's own
    UTF-8 spelling is at least as long as the text it covers (byte-level BPE spells one byte
    as one character of one or two bytes; added tokens spell their text).
    """
    from tokenizers import Tokenizer, models

    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "backend", None)
    if not isinstance(backend, Tokenizer) or backend.normalizer is not None \
            or not isinstance(backend.model, models.BPE):
        return None
    vocab = backend.get_vocab(with_added_tokens=True)
    return max([MAX_CHAR_BYTES, *(len(token.encode("utf-8")) for token in vocab)])


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    if not ids:
        raise ParameterError(f"{param}: the prompt is empty", param)
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size
               for t in ids):
        raise ParameterError(f"{param}: token ids must be integers in [0, {vocab_size})", param)


def too_long(tokens: str, max_model_len: int, param: str) -> ParameterError:
    return ParameterError(f"{param}: the prompt has {tokens} tokens; this model's context is "
                          f"{max_model_len} tokens and must leave room for one generated token",
                          param, CONTEXT_EXCEEDED)


def encode_prompt(prompt: str | list[int], tokenizer: Any, vocab_size: int, max_model_len: int,
                  byte_limit: int | None, param: str = "prompt") -> tuple[str | None, list[int]]:
    """(text or None, token ids) of a prompt given as text or ids, checked; ``byte_limit``:
    text longer than this many UTF-8 bytes cannot fit the context (None: no such bound)."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ParameterError(f"{param}: this model has no tokenizer; send token ids", param)
        try:
            size = len(prompt.encode("utf-8"))
        except UnicodeEncodeError:
            raise ParameterError(f"{param}: the text is not valid Unicode (a lone surrogate?)",
                                 param) from None
        if byte_limit is not None and size > byte_limit:
            raise too_long(f"more than {max_model_len - 1}", max_model_len, param)
        ids, text = list(tokenizer.encode(prompt)), prompt
    elif isinstance(prompt, (list, tuple)):
        ids, text = list(prompt), None
    else:
        raise ParameterError(f"{param}: a prompt must be a string or a list of token ids, got "
                             f"{type(prompt).__name__}", param)
    check_token_ids(ids, vocab_size, param)
    if len(ids) >= max_model_len:
        raise too_long(str(len(ids)), max_model_len, param)
    return text, ids
