"""The stateful distributed loader: a torch IterableDataset of packed batches plus a wrapper
around torch's DataLoader that knows, after every batch, where every worker's stream stands.

Every (rank, worker) pair is one *consumer* with global id ``rank * workers_per_rank + worker``;
it draws its documents from an interleaved slice of each dataset's global order (cursor.py) and
packs them (stream.py). Ranks never communicate: all they share is the seed.

State. ``loader.state_dict()`` is this rank's state (plain JSON-able data): the shared layout,
each of its consumers' states (RNG counters, place in every dataset, shuffle buffer, partially
packed tokens), and which worker delivers the next batch. ``load_state_dict`` takes

* this rank's own state (same world size and workers): the stream continues exactly; or
* the list of the states of all ranks of the old run: if the world size or worker count
  changed, the untaken documents of every epoch in flight, the shuffle buffers and the
  partially packed tokens are re-split deterministically among the new consumers, so within
  the epoch no document is repeated or skipped and no token is lost. (With an unchanged
  layout the list form also resumes exactly.)

Batches are dicts of tensors (see packing.py): input_ids, labels, position_ids, seq_idx (B, L)
and doc_keys (B, L+1).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bamba.data.cursor import View, rescale_views
from bamba.data.documents import DocumentSource
from bamba.data.packing import pack_batch
from bamba.data.shards import read_json, write_json
from bamba.data.stream import Consumer, ConsumerState, Layout, check_weights

log = logging.getLogger(__name__)
STATE_VERSION = 1


def rescale(layout: Layout, consumers: Sequence[ConsumerState], new_count: int
            ) -> tuple[Layout, list[ConsumerState]]:
    """Re-split what ``consumers`` (all of them, by id) left among ``new_count`` new consumers."""
    n_data = len(layout.views)
    views = tuple(tuple(rescale_views(layout.views[d], [tuple(c.places[d]) for c in consumers]))
                  for d in range(n_data))
    fresh = [ConsumerState.fresh(i, n_data) for i in range(new_count)]
    for i, c in enumerate(consumers):  # each old partial row moves whole, keeping its order
        fresh[i % new_count].pending.extend(c.pending)
    waiting = [key for c in consumers for key in c.buffer]
    for j, key in enumerate(waiting):
        fresh[j % new_count].buffer.append(key)
    fresh[0].tokens_seen = [sum(c.tokens_seen[d] for c in consumers) for d in range(n_data)]
    return Layout(layout.seed, new_count, layout.generation + 1, views), fresh


class PackedDataset(IterableDataset):
    """Endless packed batches for one rank; each DataLoader worker runs one consumer."""

    def __init__(self, sources: Sequence[DocumentSource], *, seq_len: int, batch_size: int,
                 weights: Sequence[float] | None = None, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, shuffle_buffer: int = 0,
                 mask_boundary: bool = True) -> None:
        super().__init__()
        names = [s.name for s in sources]
        if not 0 < len(sources) < 128 or len(set(names)) != len(names):
            raise ValueError(f"need 1 to 127 datasets with distinct names; got {names}")
        if seq_len < 1 or batch_size < 1 or shuffle_buffer < 0 or num_workers < 0:
            raise ValueError("seq_len and batch_size must be >= 1, shuffle_buffer and "
                             "num_workers >= 0")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.sources, self.names = list(sources), names
        self.weights = check_weights([1.0] * len(names) if weights is None else list(weights), names)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.per_rank = num_workers, max(1, num_workers)
        self.shuffle_buffer, self.mask_boundary = shuffle_buffer, mask_boundary
        total = world_size * self.per_rank
        for s, w in zip(self.sources, self.weights):
            if w > 0 and len(s) < total:
                raise ValueError(f"dataset {s.name!r} has {len(s)} documents, fewer than the "
                                 f"{total} consumers (ranks x workers)")
        self.layout = Layout(seed, total, 0, tuple((View(0, len(s)),) for s in self.sources))
        self.consumers = [ConsumerState.fresh(self._cid(r), len(names)) for r in range(self.per_rank)]
        self.next_role = 0

    def _cid(self, role: int) -> int:
        return self.rank * self.per_rank + role

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        if workers != self.per_rank:
            raise ValueError(f"dataset built for {self.per_rank} workers runs in {workers}")
        role = (worker + self.next_role) % self.per_rank  # DataLoader always starts at worker 0
        state = ConsumerState.from_dict(self.consumers[role].to_dict())
        consumer = Consumer(self.sources, self.weights, self.layout, state, self.seq_len,
                            self.shuffle_buffer)
        while True:
            rows = [consumer.next_row() for _ in range(self.batch_size)]
            yield pack_batch(rows, self.mask_boundary), {"role": role, "state": state.to_dict()}

    def record(self, snapshot: dict[str, Any]) -> None:
        """Remember the state after a delivered batch."""
        role = snapshot["role"]
        self.consumers[role] = ConsumerState.from_dict(snapshot["state"])
        self.next_role = (role + 1) % self.per_rank

    def tokens_seen(self) -> dict[str, int]:
        """Tokens this rank has emitted per dataset (sum over ranks for the global count)."""
        return {n: sum(c.tokens_seen[d] for c in self.consumers) for d, n in enumerate(self.names)}

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
                "workers_per_rank": self.per_rank, "datasets": self.names,
                "weights": self.weights, "layout": self.layout.to_dict(),
                "next_role": self.next_role, "consumers": [c.to_dict() for c in self.consumers],
                "tokens_seen": self.tokens_seen()}

    def load_state_dict(self, state: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
        states = [state] if isinstance(state, dict) else list(state)
        for s in states:
            self._check_compatible(s)
        same = (states[0]["world_size"] == self.world_size
                and states[0]["workers_per_rank"] == self.per_rank)
        if same:
            own = [s for s in states if s["rank"] == self.rank]
            if not own:
                raise ValueError(f"no loader state for rank {self.rank} among {len(states)} given")
            self._restore(own[0])
        else:
            self._rescale(states)

    def _check_compatible(self, s: dict[str, Any]) -> None:
        if s.get("version") != STATE_VERSION:
            raise ValueError(f"unknown loader state version {s.get('version')!r}")
        if s["datasets"] != self.names:
            raise ValueError(f"loader state is for datasets {s['datasets']}, not {self.names}")
        if s["layout"]["seed"] != self.seed:
            raise ValueError(f"loader state has seed {s['layout']['seed']}, loader {self.seed}")
        for source, views in zip(self.sources, s["layout"]["views"]):
            if views[0]["n"] != len(source):
                raise ValueError(f"dataset {source.name!r} has {len(source)} documents; the loader "
                                 f"state was saved with {views[0]['n']}")

    def _restore(self, s: dict[str, Any]) -> None:
        self.layout = Layout.from_dict(s["layout"])
        self.consumers = [ConsumerState.from_dict(c) for c in s["consumers"]]
        self.next_role = int(s["next_role"])

    def _rescale(self, states: Sequence[dict[str, Any]]) -> None:
        old = {(s["layout"]["generation"], s["layout"]["consumers"]) for s in states}
        if len(old) != 1:
            raise ValueError("loader states come from different runs or rescales")
        layout = Layout.from_dict(states[0]["layout"])
        by_id = {c["cid"]: ConsumerState.from_dict(c) for s in states for c in s["consumers"]}
        if sorted(by_id) != list(range(layout.consumers)):
            raise ValueError(f"rescaling needs the loader states of all {states[0]['world_size']} "
                             f"ranks; got {len(states)}")
        total = self.world_size * self.per_rank
        self.layout, fresh = rescale(layout, [by_id[i] for i in range(layout.consumers)], total)
        self.consumers = fresh[self._cid(0):self._cid(0) + self.per_rank]
        self.next_role = 0
        log.info("loader rescaled from %d to %d consumers", layout.consumers, total)


def _identity(x: Any) -> Any:
    return x


class StatefulLoader:
    """DataLoader over a PackedDataset that keeps the state of what it has delivered."""

    def __init__(self, dataset: PackedDataset, *, pin_memory: bool = False,
                 multiprocessing_context: str | None = None) -> None:
        self.dataset = dataset
        self.num_workers = dataset.num_workers
        self.pin_memory, self.context = pin_memory, multiprocessing_context

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                            collate_fn=_identity, pin_memory=self.pin_memory,
                            multiprocessing_context=self.context if self.num_workers else None)
        for batch, snapshot in loader:
            self.dataset.record(snapshot)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
        self.dataset.load_state_dict(state)

    def tokens_seen(self) -> dict[str, int]:
        return self.dataset.tokens_seen()


def write_state(directory: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Save one rank's loader state as ``loader-rank{R}.json`` in a checkpoint directory."""
    path = Path(directory) / f"loader-rank{state['rank']:05d}.json"
    write_json(path, state)
    return path


def read_states(directory: str | os.PathLike) -> list[dict[str, Any]]:
    """All ranks' loader states from a checkpoint directory (for ``load_state_dict``)."""
    paths = sorted(Path(directory).glob("loader-rank*.json"))
    if not paths:
        raise FileNotFoundError(f"no loader-rank*.json in {directory}")
    return [read_json(p) for p in paths]


def build_loader(sources: Sequence[DocumentSource], *, seq_len: int, batch_size: int,
                 weights: Sequence[float] | None = None, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, shuffle_buffer: int = 0,
                 mask_boundary: bool = True, pin_memory: bool = False) -> StatefulLoader:
    """The loader of one rank: ``num_workers`` DataLoader workers (0 = in this process)."""
    dataset = PackedDataset(sources, seq_len=seq_len, batch_size=batch_size, weights=weights,
                            seed=seed, rank=rank, world_size=world_size, num_workers=num_workers,
                            shuffle_buffer=shuffle_buffer, mask_boundary=mask_boundary)
    return StatefulLoader(dataset, pin_memory=pin_memory)
