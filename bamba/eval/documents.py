"""The documents an evaluation reads, as token ids: whole text files, JSONL lines (one text
field each) or the documents of ``bamba tokenize`` shard directories."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

FORMATS = ("text", "jsonl", "shards")


def _existing(path: str) -> Path:
    found = Path(path)
    if not found.exists():
        raise FileNotFoundError(f"no such file or directory: {path}")
    return found


def read_text_file(path: str) -> str:
    """A whole UTF-8 file as one document; ValueError if it is not text or holds none."""
    found = _existing(path)
    if found.is_dir():
        raise ValueError(f"{path} is a directory, not a text file")
    try:
        text = found.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not valid UTF-8 (byte {exc.start})") from None
    if not text.strip():
        raise ValueError(f"{path} holds no text")
    return text


def read_jsonl_texts(path: str, text_key: str) -> list[str]:
    """The non-empty ``text_key`` strings of a .jsonl file, one document a line."""
    from bamba.data.sources import read_documents

    found = _existing(path)
    if found.suffix != ".jsonl":
        raise ValueError(f"{path}: --format jsonl reads .jsonl files")
    texts = list(read_documents(found, text_field=text_key, strict=True))
    if not texts:
        raise ValueError(f"{path} holds no text under the key {text_key!r}")
    return texts


def read_shard_documents(path: str, vocab_size: int, limit: int | None = None
                         ) -> list[np.ndarray]:
    """The first ``limit`` (None: all) documents of a ``bamba tokenize`` output directory;
    their ids must fit the model."""
    from bamba.data.documents import ShardDocuments

    shards = ShardDocuments(_existing(path))
    count = len(shards) if limit is None else min(limit, len(shards))
    documents = [shards.tokens(i).astype(np.int64) for i in range(count)]
    largest = max((int(doc.max()) for doc in documents if len(doc)), default=None)
    if largest is None:
        raise ValueError(f"{path} holds no tokens")
    if largest >= vocab_size:
        raise ValueError(f"{path} holds token id {largest}, beyond this model's vocabulary of "
                         f"{vocab_size} (tokenized with another tokenizer?)")
    smallest = min(int(doc.min()) for doc in documents if len(doc))
    if smallest < 0:
        raise ValueError(f"{path} holds token id {smallest}: token ids are not negative")
    return documents


def load_documents(paths: Sequence[str], fmt: str, encode: Callable[[str], list[int]] | None,
                   vocab_size: int, text_key: str = "text", max_documents: int | None = None
                   ) -> list[Sequence[int]]:
    """Token ids of every document of ``paths`` in order (at most ``max_documents``); ``encode``
    tokenizes the text formats."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if not paths:
        raise ValueError("no input files")
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max documents must be >= 1, got {max_documents}")
    documents: list[Sequence[int]] = []
    for path in paths:
        if fmt == "shards":
            left = None if max_documents is None else max_documents - len(documents)
            documents += read_shard_documents(path, vocab_size, left)
        else:
            assert encode is not None, "text formats need a tokenizer"
            texts = [read_text_file(path)] if fmt == "text" else read_jsonl_texts(path, text_key)
            documents += [encode(text) for text in texts]
        if max_documents is not None and len(documents) >= max_documents:
            return documents[:max_documents]
    return documents
