"""The stateful loader: exact resume, rescale without loss or repetition, mixing, bad input."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest
import torch

from bamba.data.cursor import View, rescale_views, view_at
from bamba.data.loader import build_loader
from bamba.data.packing import IGNORE_INDEX, pack_batch
from bamba.data.permute import Permutation, mix_key
from bamba.data.stream import doc_key

torch.set_num_threads(1)
SEQ = 16


class ListDocuments:
    """Synthetic dataset: token j of document i of dataset d is d*10^6 + i*1000 + j (unique)."""

    def __init__(self, name: str, dataset: int, lengths: list[int]) -> None:
        self.name = name
        self.docs = [dataset * 10**6 + i * 1000 + np.arange(n, dtype=np.int64)
                     for i, n in enumerate(lengths)]

    def __len__(self) -> int:
        return len(self.docs)

    def tokens(self, index: int) -> np.ndarray:
        return self.docs[index]


def corpus() -> list[ListDocuments]:
    rng = np.random.default_rng(0)
    a = rng.integers(1, 24, size=60).tolist()
    a[7] = a[30] = 3 * SEQ + 5  # longer than a row: must be split, never dropped
    b = rng.integers(1, 12, size=37).tolist()
    return [ListDocuments("a", 0, a), ListDocuments("b", 1, b)]


def make(rank=0, world=1, workers=0, weights=(0.7, 0.3), shuffle=4, mask=True, seed=3):
    return build_loader(corpus(), seq_len=SEQ, batch_size=2, weights=list(weights), seed=seed,
                        rank=rank, world_size=world, num_workers=workers, shuffle_buffer=shuffle,
                        mask_boundary=mask)


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def roundtrip(state):
    return json.loads(json.dumps(state))  # what a checkpoint stores: plain JSON


def assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


# ---- permutation and views --------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 17, 64, 1000])
def test_permutation_is_a_bijection(n):
    perm = Permutation(n, mix_key(1, 2, 3))
    assert sorted(perm(i) for i in range(n)) == list(range(n))


def test_permutation_depends_on_key_and_shuffles():
    a = [Permutation(500, mix_key(0, 0, e))(i) for e in (0, 1) for i in range(500)]
    assert a[:500] != a[500:]
    assert a[:500] != list(range(500))


def brute_left(n, frontier, holes, taken, consumers):
    """Positions left, by explicit sets: the reference for View.without."""
    r = [p for p in range(frontier, n) if p not in holes]
    gone = {r[c + j * consumers] for c, k in enumerate(taken) for j in range(k)}
    return [p for p in r if p not in gone]


@pytest.mark.parametrize("trial", range(30))
def test_view_without_matches_sets(trial):
    rng = np.random.default_rng(trial)
    n = int(rng.integers(1, 80))
    frontier = int(rng.integers(0, n))
    holes = tuple(sorted(set(rng.integers(frontier, n, size=int(rng.integers(0, 6))).tolist())))
    view = View(0, n, frontier, holes)
    consumers = int(rng.integers(1, 6))
    taken = [int(rng.integers(0, view.share(c, consumers) + 1)) for c in range(consumers)]
    left = view.without(taken)
    expect = brute_left(n, frontier, set(holes), taken, consumers)
    assert [left.position(i) for i in range(len(left))] == expect


def test_rescale_views_across_epochs():
    views = (View(0, 10),)
    # consumer 0 is already in epoch 1 (took 2 there); consumer 1 is in epoch 0 (took 1).
    new = rescale_views(views, [(1, 2), (0, 1)])
    assert [v.epoch for v in new] == [0, 1]
    assert [new[0].position(i) for i in range(len(new[0]))] == [3, 5, 7, 9]
    assert [new[1].position(i) for i in range(len(new[1]))] == [1, 3, 4, 5, 6, 7, 8, 9]
    assert view_at(new, 2).epoch == 2 and len(view_at(new, 2)) == 10


# ---- packing -----------------------------------------------------------------------------------
def test_pack_batch_marks_boundaries():
    keys = np.array([5, 5, 5, 9, 9, 2], dtype=np.int64)
    toks = np.arange(6, dtype=np.int64) + 100
    b = pack_batch([(toks, keys)], mask_boundary=True)
    assert b["input_ids"].tolist() == [[100, 101, 102, 103, 104]]
    assert b["labels"].tolist() == [[101, 102, IGNORE_INDEX, 104, IGNORE_INDEX]]
    assert b["seq_idx"].tolist() == [[0, 0, 0, 1, 1]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert pack_batch([(toks, keys)], mask_boundary=False)["labels"].tolist() == [[101, 102, 103, 104, 105]]


# ---- exact resume --------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume(workers):
    total, cut = 30, 7  # 30 batches cross an epoch boundary; 7 is odd: resume mid worker cycle
    reference = take(make(workers=workers), total)
    first = make(workers=workers)
    head = take(first, cut)
    state = roundtrip(first.state_dict())
    assert any(c["pending"] for c in state["consumers"])  # a partial row is part of the state
    resumed = make(workers=workers)
    resumed.load_state_dict(state)
    assert_same_batches(head + take(resumed, total - cut), reference)


def test_exact_resume_of_every_rank_from_the_list_of_states():
    reference = [take(make(rank=r, world=2, workers=2), 9) for r in range(2)]
    firsts = [make(rank=r, world=2, workers=2) for r in range(2)]
    heads = [take(f, 4) for f in firsts]
    states = [roundtrip(f.state_dict()) for f in firsts]
    for r in range(2):
        resumed = make(rank=r, world=2, workers=2)
        resumed.load_state_dict(states)  # the checkpoint's list: each rank finds its own
        assert_same_batches(heads[r] + take(resumed, 5), reference[r])
    assert not torch.equal(reference[0][0]["input_ids"], reference[1][0]["input_ids"])


def test_iterating_again_continues():
    reference = take(make(), 10)
    loader = make()
    assert_same_batches(take(loader, 4) + take(loader, 6), reference)


def test_exact_resume_fails_without_partial_rows():
    """The exact-resume check is sharp: dropping the partially packed tokens breaks it."""
    reference = take(make(), 10)
    first = make()
    head = take(first, 3)
    state = roundtrip(first.state_dict())
    for c in state["consumers"]:
        c["pending"] = []
    resumed = make()
    resumed.load_state_dict(state)
    with pytest.raises(AssertionError):
        assert_same_batches(head + take(resumed, 7), reference)


# ---- rescale -------------------------------------------------------------------------------------
def run_ranks(world, workers, batches, states=None, weights=(0.7, 0.3)):
    """Run every rank for ``batches`` batches; return their rows and states."""
    rows, out_states = [], []
    for rank in range(world):
        loader = make(rank=rank, world=world, workers=workers, weights=weights, mask=False)
        if states is not None:
            loader.load_state_dict(states)
        for batch in take(loader, batches):
            full = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1)
            rows.extend(zip(full.tolist(), batch["doc_keys"].tolist()))
        out_states.append(roundtrip(loader.state_dict()))
    return rows, out_states


def epoch_documents(rows, epoch):
    """Concatenate, per document of ``epoch``, its tokens in emission order."""
    docs = defaultdict(list)
    for tokens, keys in rows:
        for t, k in zip(tokens, keys):
            if (k >> 40) & 0xFFFF == epoch:
                docs[k].append(t)
    return docs


def check_epoch0_complete(rows, epoch=0):
    """Every document of the epoch appears exactly once, whole, its tokens in order."""
    data = corpus()
    docs = epoch_documents(rows, epoch)
    for d, source in enumerate(data):
        for i in range(len(source)):
            got = docs.pop(doc_key(d, epoch, i), [])
            assert got == source.docs[i].tolist(), f"dataset {d} document {i} epoch {epoch}"
    assert not docs


@pytest.mark.parametrize("old,new", [((2, 2), (3, 0)), ((3, 0), (1, 2)), ((1, 2), (2, 1))])
def test_rescale_keeps_every_document_once(old, new):
    rows, states = run_ranks(*old, batches=5)
    assert any(c["pending"] for s in states for c in s["consumers"])
    more, new_states = run_ranks(*new, batches=60, states=states)
    check_epoch0_complete(rows + more)
    seen = [sum(s["tokens_seen"][n] for s in new_states) for n in ("a", "b")]
    assert sum(seen) == len(rows + more) * (SEQ + 1)  # tokens seen survive the rescale


def test_rescale_check_detects_a_naive_restart():
    rows, _ = run_ranks(2, 2, batches=5)
    more, _ = run_ranks(3, 0, batches=60)  # restart from scratch: repeats documents
    with pytest.raises(AssertionError):
        check_epoch0_complete(rows + more)


def test_rescale_across_an_epoch_boundary():
    rows, states = run_ranks(2, 2, batches=14)
    views = [{c["places"][d][0] for s in states for c in s["consumers"]} for d in range(2)]
    assert views[0] == views[1] == {0, 1}  # consumers are split between epochs 0 and 1
    more, _ = run_ranks(3, 0, batches=110, states=states)
    check_epoch0_complete(rows + more, epoch=0)
    check_epoch0_complete(rows + more, epoch=1)


def test_rescale_twice():
    rows, states = run_ranks(2, 0, batches=3)
    more, states = run_ranks(3, 0, batches=4, states=states)
    last, _ = run_ranks(1, 2, batches=80, states=states)
    check_epoch0_complete(rows + more + last)


def test_states_saved_and_read_from_a_checkpoint_directory(tmp_path):
    from bamba.data.loader import read_states, write_state

    _, states = run_ranks(2, 0, batches=2)
    for st in states:
        write_state(tmp_path, st)
    assert read_states(tmp_path) == states
    loader = make(world=3)
    loader.load_state_dict(read_states(tmp_path))
    assert loader.state_dict()["layout"]["generation"] == 1


def test_state_of_another_dataset_is_refused():
    first = make()
    take(first, 2)
    state = roundtrip(first.state_dict())
    other = build_loader([ListDocuments("a", 0, [5] * 61), ListDocuments("b", 1, [5] * 37)],
                         seq_len=SEQ, batch_size=2, seed=3)
    with pytest.raises(ValueError, match="saved with 60"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        make(seed=4).load_state_dict(state)


def test_rescale_needs_all_ranks():
    _, states = run_ranks(2, 0, batches=2)
    loader = make(world=3)
    with pytest.raises(ValueError, match="all 2 ranks"):
        loader.load_state_dict(states[:1])


# ---- mixing and weights ------------------------------------------------------------------------
def test_weights_change_on_resume_and_tokens_counted():
    first = make(weights=(0.5, 0.5))
    take(first, 6)
    state = roundtrip(first.state_dict())
    before = state["tokens_seen"]
    assert before["a"] > 0 and before["b"] > 0
    assert before["a"] + before["b"] == 6 * 2 * (SEQ + 1)
    resumed = make(weights=(1.0, 0.0))  # dataset b switched off
    resumed.load_state_dict(state)
    take(resumed, 6)
    after = resumed.tokens_seen()
    assert after["a"] + after["b"] == 12 * 2 * (SEQ + 1)
    # b only finishes what was already drawn (buffer + partial row), then no more b tokens
    assert after["b"] - before["b"] <= sum(len(d) for d in corpus()[1].docs[:]) and after["a"] > before["a"]


def test_zero_weight_dataset_is_never_drawn():
    batches = take(make(weights=(1.0, 0.0)), 10)
    keys = torch.cat([b["doc_keys"].flatten() for b in batches])
    assert bool(((keys >> 56) == 0).all())


@pytest.mark.parametrize("weights", [(1.0, -0.5), (0.0, 0.0), (float("nan"), 1.0), (1.0,)])
def test_bad_weights(weights):
    with pytest.raises(ValueError):
        make(weights=weights)


def test_dataset_smaller_than_consumers():
    with pytest.raises(ValueError, match="fewer than"):
        build_loader([ListDocuments("x", 0, [3, 4])], seq_len=SEQ, batch_size=1, world_size=3)


@pytest.mark.parametrize("workers", [0, 2])
def test_empty_data_raises_instead_of_hanging(workers):
    loader = build_loader([ListDocuments("x", 0, [0, 0, 0])], seq_len=SEQ, batch_size=1,
                          num_workers=workers)
    with pytest.raises(ValueError, match="no tokens"):
        take(loader, 1)


def test_missing_dataset_directory(tmp_path):
    from bamba.data.documents import ShardDocuments, TextDocuments

    with pytest.raises(FileNotFoundError, match="manifest.json"):
        ShardDocuments(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="no such file"):
        TextDocuments([tmp_path / "nothing"], tmp_path)


def test_long_documents_are_split_not_dropped():
    loader = build_loader([ListDocuments("x", 0, [50, 3])], seq_len=SEQ, batch_size=1)
    rows = [(b["input_ids"][0].tolist() + b["labels"][0, -1:].tolist()) for b in take(loader, 6)]
    flat = [t for r in rows for t in r]
    for doc in ListDocuments("x", 0, [50, 3]).docs:
        assert [t for t in flat if t // 1000 == doc[0] // 1000][: len(doc)] == doc.tolist()
