"""What the trainer needs from a data loader, and a deterministic in-memory source for tests.

A ``BatchSource`` is an iterator of batches ``{"input_ids", "labels", "seq_idx"}`` (each
[B, L] int64; ``labels`` already aligned with the positions, -100 where no loss is taken;
``seq_idx`` the document id of every token of a packed row) with ``state_dict()`` /
``load_state_dict()`` so a resumed run sees exactly the batches an uninterrupted one would.
``load_state_dict`` takes one rank's state or the list of every rank's state of the run that
saved it (the trainer passes the list; the source picks its own or re-splits, as
``bamba.data.loader`` does). Extra keys (``position_ids``, ``doc_keys``) may ride along.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol

import torch

from bamba.train.loss import IGNORE_INDEX

Batch = dict[str, torch.Tensor]


class BatchSource(Protocol):
    def __iter__(self) -> Iterator[Batch]: ...

    def __next__(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RowStream:
    """One global stream of packed rows, row ``g`` a pure function of ``g`` (``row(g)``).

    Each step every rank takes ``batch_size`` consecutive rows (rank r takes rows
    ``rows + r*B .. rows + (r+1)*B``), so the state is one number, the same on every rank, and
    a resume at another world size continues the stream with no row repeated or skipped.
    """

    def __init__(self, batch_size: int, rank: int, world_size: int) -> None:
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.rows = 0  # global rows consumed by all ranks

    def row(self, g: int) -> Batch:
        raise NotImplementedError

    def __iter__(self) -> "RowStream":
        return self

    def __next__(self) -> Batch:
        first = self.rows + self.rank * self.batch_size
        rows = [self.row(g) for g in range(first, first + self.batch_size)]
        self.rows += self.batch_size * self.world_size
        return {key: torch.stack([r[key] for r in rows]) for key in rows[0]}


class SyntheticSource(RowStream):
    """Packed rows of learnable documents; global row ``g`` is a pure function of (seed, g).
    A document is an arithmetic progression mod the vocabulary (learnable),
    3..L tokens long; its global id is ``(row, index in row)``.
    """

    FIRST_TOKEN = 3  # ids below are left for special tokens

    def __init__(self, *, vocab_size: int, seq_len: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0) -> None:
        if vocab_size <= self.FIRST_TOKEN + 1:
            raise ValueError(f"vocab_size must be > {self.FIRST_TOKEN + 1}, got {vocab_size}")
        if seq_len < 3:
            raise ValueError(f"seq_len must be >= 3, got {seq_len}")
        super().__init__(batch_size, rank, world_size)
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed

    def documents(self, g: int) -> list[torch.Tensor]:
        """The documents packed into global row ``g``."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + g)
        span = self.vocab_size - self.FIRST_TOKEN
        docs, used = [], 0
        while used < self.seq_len:
            length = min(int(torch.randint(3, self.seq_len + 1, (1,), generator=gen)),
                         self.seq_len - used)
            start, stride = torch.randint(0, span, (2,), generator=gen).tolist()
            docs.append((start + (stride % 7 + 1) * torch.arange(length)) % span + self.FIRST_TOKEN)
            used += length
        return docs

    def row(self, g: int) -> Batch:
        docs = self.documents(g)
        labels = []
        for doc in docs:  # next token inside the document; none across a boundary
            labels.append(torch.cat([doc[1:], torch.tensor([IGNORE_INDEX])]))
        seq_idx = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])
        return {"input_ids": torch.cat(docs), "labels": torch.cat(labels), "seq_idx": seq_idx}

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """One rank's state or every rank's: they are the same (the stream is global)."""
        if isinstance(state, list):
            state = state[0]
        if state.get("seed") != self.seed:
            raise ValueError(f"data state is for seed {state.get('seed')}, this run uses {self.seed}")
        self.rows = int(state["rows"])


class LoaderSource:
    """``bamba.data.loader.StatefulLoader`` as a ``BatchSource``: the DataLoader iterator is
    opened lazily, so a state loaded before the first batch is the one the workers start from."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self._it: Iterator[Batch] | None = None

    def __iter__(self) -> "LoaderSource":
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            self._it = iter(self.loader)
        return next(self._it)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """One rank's state, or the list of every rank's (rescaling to a new world size)."""
        self.loader.load_state_dict(state)
        self._it = None

    def tokens_seen(self) -> dict[str, int]:
        return self.loader.tokens_seen()


def build_loader_source(kind: str, paths: list[str], options: dict[str, Any], *, seq_len: int,
                        batch_size: int, seed: int, rank: int, world_size: int,
                        tokenizer: str | None = None) -> LoaderSource:
    """The real loader over pre-tokenized shard directories (``kind="shards"``, one dataset per
    path) or raw text files tokenized on the fly (``kind="text"``, one dataset of all paths).

    ``options``: weights (one per dataset), num_workers, shuffle_buffer, mask_boundary,
    text_field (text only)."""
    from bamba.data.documents import ShardDocuments, TextDocuments
    from bamba.data.loader import build_loader

    allowed = {"weights", "num_workers", "shuffle_buffer", "mask_boundary", "text_field"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"unknown data_options key {unknown[0]!r}; known: {', '.join(sorted(allowed))}")
    if kind == "shards":
        sources: list[Any] = [ShardDocuments(p) for p in paths]
    elif kind == "text":
        if tokenizer is None:
            raise ValueError("data='text' (on-the-fly tokenization) needs tokenizer")
        sources = [TextDocuments(paths, tokenizer, text_field=options.get("text_field", "text"))]
    else:
        raise ValueError(f"unknown data kind {kind!r}")
    loader = build_loader(sources, seq_len=seq_len, batch_size=batch_size,
                          weights=options.get("weights"), seed=seed, rank=rank,
                          world_size=world_size, num_workers=options.get("num_workers", 0),
                          shuffle_buffer=options.get("shuffle_buffer", 0),
                          mask_boundary=options.get("mask_boundary", True))
    return LoaderSource(loader)
