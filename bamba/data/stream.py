"""One consumer's stream: weighted dataset choice, an optional shuffle buffer, and packing.

A consumer (one DataLoader worker of one rank) turns documents into rows of ``seq_len + 1``
tokens. Its whole state is small and explicit (``ConsumerState``): its place in every dataset
(see cursor.py), its RNG counters, the document references waiting in its shuffle buffer, and
the tokens already drawn but not yet emitted (``pending``: the partially packed row, recorded as
(document key, first token, end token) references — sources are immutable and tokenization is
deterministic, so the references restore exactly the same tokens while keeping the state small
even when a very long document is being split). A document key packs (dataset, epoch, index)
into one int64: dataset << 56 | epoch << 40 | index.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from bamba.data.cursor import View, view_at
from bamba.data.documents import DocumentSource
from bamba.data.permute import Permutation, mix_key, randbelow, uniform

_MIX, _SHUFFLE = 1, 2
_INDEX_MASK = (1 << 40) - 1


def doc_key(dataset: int, epoch: int, index: int) -> int:
    """One int64 naming a document draw; the epoch is kept modulo 2^16 (it only labels)."""
    if not (dataset < 128 and index < 1 << 40):
        raise ValueError(f"document key out of range: dataset {dataset} index {index}")
    return dataset << 56 | (epoch & 0xFFFF) << 40 | index


def key_dataset(keys: np.ndarray) -> np.ndarray:
    return keys >> 56


def check_weights(weights: Sequence[float], names: Sequence[str]) -> list[float]:
    """Weights must be finite and >= 0 with a positive sum; a zero weight excludes a dataset."""
    if len(weights) != len(names):
        raise ValueError(f"{len(weights)} weights for {len(names)} datasets")
    for w, name in zip(weights, names):
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"dataset {name!r} has weight {w}; weights must be finite and >= 0")
    if sum(weights) <= 0:
        raise ValueError("all dataset weights are zero")
    return [float(w) for w in weights]


@dataclasses.dataclass(frozen=True)
class Layout:
    """What all consumers share: seed, consumer count, rescale generation, views per dataset."""

    seed: int
    consumers: int
    generation: int
    views: tuple[tuple[View, ...], ...]

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "consumers": self.consumers, "generation": self.generation,
                "views": [[v.to_dict() for v in vs] for vs in self.views]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Layout:
        views = tuple(tuple(View.from_dict(v) for v in vs) for vs in d["views"])
        return cls(int(d["seed"]), int(d["consumers"]), int(d["generation"]), views)


@dataclasses.dataclass
class ConsumerState:
    """Everything that decides what consumer ``cid`` yields next. JSON-friendly via to_dict."""

    cid: int
    places: list[list[int]]          # per dataset: [view index, items taken from that view]
    draws: int = 0                   # dataset-choice RNG counter
    shuffles: int = 0                # shuffle-buffer RNG counter
    buffer: list[int] = dataclasses.field(default_factory=list)   # document keys waiting
    pending: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)  # (key, start, end)
    tokens_seen: list[int] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"cid": self.cid, "places": [list(p) for p in self.places], "draws": self.draws,
                "shuffles": self.shuffles, "buffer": list(self.buffer),
                "pending": [list(p) for p in self.pending],
                "tokens_seen": list(self.tokens_seen)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConsumerState:
        return cls(int(d["cid"]), [list(map(int, p)) for p in d["places"]], int(d["draws"]),
                   int(d["shuffles"]), list(map(int, d["buffer"])),
                   [(int(k), int(a), int(b)) for k, a, b in d["pending"]],
                   list(map(int, d["tokens_seen"])))

    @classmethod
    def fresh(cls, cid: int, n_datasets: int) -> ConsumerState:
        return cls(cid, [[0, 0] for _ in range(n_datasets)], tokens_seen=[0] * n_datasets)


class Consumer:
    """Produces packed rows for one consumer from its state; the state is updated in place."""

    def __init__(self, sources: Sequence[DocumentSource], weights: Sequence[float], layout: Layout,
                 state: ConsumerState, seq_len: int, shuffle_buffer: int = 0) -> None:
        self.sources, self.layout, self.state = sources, layout, state
        self.cumulative = np.cumsum(weights).tolist()
        self.row_len = seq_len + 1
        self.shuffle_buffer = shuffle_buffer
        self._perms: dict[tuple[int, int], Permutation] = {}
        self._mix_key = mix_key(layout.seed, layout.generation, state.cid, _MIX)
        self._shuffle_key = mix_key(layout.seed, layout.generation, state.cid, _SHUFFLE)
        self._pending_len = sum(b - a for _, a, b in state.pending)
        self._cache: dict[int, np.ndarray] = {}  # tokens of the pending documents
        # Consecutive empty documents tolerated before declaring the data empty (no hang).
        self._empty_limit = sum(len(s) for s in sources) + shuffle_buffer + 1

    def _choose_dataset(self) -> int:
        u = uniform(self._mix_key, self.state.draws) * self.cumulative[-1]
        self.state.draws += 1
        # side="right" never lands on a zero-weight dataset (its cumulative equals the previous).
        return min(int(np.searchsorted(self.cumulative, u, side="right")), len(self.cumulative) - 1)

    def _take(self, d: int) -> int:
        """The next document of dataset d in this consumer's slice of the global order."""
        vi, k = self.state.places[d]
        c, n_cons = self.state.cid, self.layout.consumers
        view = view_at(self.layout.views[d], vi)
        while k >= view.share(c, n_cons):
            vi, k = vi + 1, 0
            view = view_at(self.layout.views[d], vi)
        self.state.places[d] = [vi, k + 1]
        perm = self._perms.get((d, view.epoch))
        if perm is None:  # the order of an epoch depends on (seed, dataset, epoch) only
            perm = Permutation(view.n, mix_key(self.layout.seed, d, view.epoch))
            self._perms[d, view.epoch] = perm
        return doc_key(d, view.epoch, perm(view.position(c + k * n_cons)))

    def _next_document(self) -> int:
        buf = self.state.buffer
        if self.shuffle_buffer <= 0 and not buf:  # a buffer inherited from a resume drains first
            return self._take(self._choose_dataset())
        while len(buf) < self.shuffle_buffer:
            buf.append(self._take(self._choose_dataset()))
        j = randbelow(self._shuffle_key, self.state.shuffles, len(buf))
        self.state.shuffles += 1
        buf[j], buf[-1] = buf[-1], buf[j]
        return buf.pop()

    def _fill(self) -> None:
        empty = 0
        while self._pending_len < self.row_len:
            key = self._next_document()
            tokens = self._tokens(key)
            if len(tokens) == 0:
                empty += 1
                if empty > self._empty_limit:
                    raise ValueError(f"{empty} documents in a row had no tokens: the data is empty")
                continue
            empty = 0
            self.state.pending.append((key, 0, len(tokens)))
            self._pending_len += len(tokens)

    def _tokens(self, key: int) -> np.ndarray:
        tokens = self._cache.get(key)
        if tokens is None:
            tokens = np.asarray(self.sources[key >> 56].tokens(key & _INDEX_MASK), dtype=np.int64)
            self._cache[key] = tokens
        return tokens

    def next_row(self) -> tuple[np.ndarray, np.ndarray]:
        """The next ``seq_len + 1`` tokens and their document keys (documents split as needed)."""
        self._fill()
        tokens, keys, need = [], [], self.row_len
        pending = self.state.pending
        while need:
            key, start, end = pending[0]
            take = min(need, end - start)
            tokens.append(self._tokens(key)[start:start + take])
            keys.append(np.full(take, key, dtype=np.int64))
            if start + take == end:
                pending.pop(0)
                self._cache.pop(key, None)
            else:
                pending[0] = (key, start + take, end)
            need -= take
        self._pending_len -= self.row_len
        keys_arr = np.concatenate(keys)
        counts = np.bincount(key_dataset(keys_arr), minlength=len(self.sources))
        self.state.tokens_seen = [a + int(b) for a, b in zip(self.state.tokens_seen, counts)]
        return np.concatenate(tokens), keys_arr
