"""Engine parts in isolation: page pools, the byte budget split, the prefix hash chain,
incremental detokenisation, stop strings and SamplingParams validation."""

from __future__ import annotations

import pytest
import torch

from bamba.config import preset
from bamba.engine.page_pool import PagePool, kv_bytes_per_block, plan_pools, state_bytes_per_slot
from bamba.engine.detok import IncrementalDetokenizer, find_stop
from bamba.engine.params import SamplingParams
from bamba.engine.prefix_cache import PrefixCache, block_hashes
from bamba.engine.scheduler import Sequence
from bamba.engine.sequence import SequenceOutput


class ByteTokenizer:
    """Token i is byte i: every non-ASCII character spans several tokens."""

    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


TEXT = "héllo 東京 wörld 🙂!"


def test_pool_sizes_follow_the_config_without_padding() -> None:
    cfg = preset("bamba-9b")
    block = kv_bytes_per_block(cfg, 16, torch.bfloat16)
    assert block == 16 * 3 * 2 * 8 * 128 * 2
    slot = state_bytes_per_slot(cfg, torch.bfloat16, torch.float32)
    conv = 3 * (2 * 4096 + 2 * 128) * 2
    assert slot == 29 * (conv + 128 * 64 * 128 * 4)
    budget = 8 * 10**9
    plan = plan_pools(cfg, budget, 16, torch.bfloat16, torch.float32, max_num_seqs=16,
                      max_model_len=4096, prefix_caching=True)
    assert plan.num_slots == 32 and plan.slot_bytes == slot and plan.block_bytes == block
    assert plan.total_bytes <= budget < plan.total_bytes + block  # the rest is all KV blocks
    no_cache = plan_pools(cfg, budget, 16, torch.bfloat16, torch.float32, 16, 4096, False)
    assert no_cache.num_slots == 16 and no_cache.num_blocks > plan.num_blocks
    with pytest.raises(ValueError, match="budget"):
        plan_pools(cfg, 1000, 16, torch.bfloat16, torch.float32, 16, 4096, True)


def test_pool_split_caps_slots_at_half_the_budget() -> None:
    cfg = preset("tiny")
    slot = state_bytes_per_slot(cfg, torch.float32, torch.float32)
    plan = plan_pools(cfg, 10 * slot, 16, torch.float32, torch.float32, 64, 1024, True)
    assert plan.num_slots == 5 and plan.total_bytes <= 10 * slot


def test_page_pool_refcounts_cache_and_lru_eviction() -> None:
    pool = PagePool(3, "test")
    a, b = pool.allocate(2)
    assert pool.allocate(2) is None and pool.num_free == 1  # "cannot allocate" is None
    assert pool.register(a, "ka") and not pool.register(b, "ka")
    pool.register(b, "kb")
    pool.release([a, b])
    assert pool.num_free == 3 and pool.num_cached == 2  # cached pages count as free
    pool.touch(a)  # a becomes most recent: b is evicted first
    (c,) = pool.allocate(1)
    assert pool.lookup("ka") == a and pool.lookup("kb") == b  # the never-used page came first
    d, = pool.allocate(1)
    assert d == b and pool.lookup("kb") is None and pool.lookup("ka") == a
    pool.acquire(a)  # a prefix hit takes a out of the LRU
    assert pool.allocate(1) is None
    pool.release([a, c, d])
    assert pool.num_free == 3 and pool.refcount(a) == 0
    with pytest.raises(AssertionError):
        pool.release([a])


def test_hash_chain_depends_on_the_whole_prefix() -> None:
    x = list(range(12))
    y = [99] + x[1:]
    hx, hy = block_hashes(x, 4, 3), block_hashes(y, 4, 3)
    assert len(hx) == 3 and all(a != b for a, b in zip(hx, hy, strict=True))
    assert block_hashes(x, 4, 3, known=hx[:1]) == hx
    assert block_hashes(x + [5], 4, 2) == hx[:2]


def test_prefix_match_needs_a_state_snapshot_for_hybrids() -> None:
    blocks, slots = PagePool(8, "block"), PagePool(4, "slot")
    cache = PrefixCache(blocks, slots, 4, has_mamba=True)
    hashes = block_hashes(list(range(16)), 4, 4)
    pages = blocks.allocate(4)
    cache.register_blocks(pages, hashes, 0)
    blocks.release(pages)
    assert cache.match(hashes).num_tokens == 0  # KV without any state snapshot
    (snap,) = slots.allocate(1)
    slots.register(snap, hashes[1])
    slots.release([snap])
    hit = cache.match(hashes)
    assert (hit.num_tokens, hit.block_ids, hit.snapshot_slot) == (8, pages[:2], snap)
    assert blocks.refcount(pages[0]) == 1 and slots.refcount(snap) == 1
    attention_only = PrefixCache(PagePool(8, "b"), PagePool(1, "s"), 4, has_mamba=False)
    p = attention_only.blocks.allocate(4)
    attention_only.register_blocks(p, hashes, 0)
    assert attention_only.match(hashes).num_tokens == 16


@pytest.mark.parametrize("tokenizer_kind", ["bytes", "bpe"])
def test_incremental_detok_never_splits_a_character(tokenizer_kind: str) -> None:
    if tokenizer_kind == "bytes":
        tok = ByteTokenizer()
    else:
        from conftest import build_tokenizer
        tok = build_tokenizer()
    kwargs = {} if tokenizer_kind == "bytes" else {"add_special_tokens": False}
    ids, prompt = tok.encode(TEXT, **kwargs), tok.encode("prompt: ", **kwargs)
    detok = IncrementalDetokenizer(tok, prompt)
    pieces = [detok.add(t) for t in ids]
    assert "".join(pieces) == TEXT == detok.text
    assert not any("\ufffd" in p for p in pieces)
    if tokenizer_kind == "bytes":
        assert pieces.count("") >= 5  # multi-byte characters were held back


def test_detok_flush_keeps_a_truncated_character_visible() -> None:
    detok = IncrementalDetokenizer(ByteTokenizer(), [])
    for t in "ok 東".encode()[:-1]:
        detok.add(t)
    assert detok.text == "ok "
    assert detok.flush() == "\ufffd" and detok.text == "ok \ufffd"


def _feed(text: str, params: SamplingParams) -> tuple[SequenceOutput, str]:
    tok = ByteTokenizer()
    seq = Sequence(0, [65], 1)
    out = SequenceOutput(seq, 0, params, max_tokens=100, eos_ids=[], seed=0, tokenizer=tok)
    streamed = ""
    for t in tok.encode(text):
        out.append(t, None, max_model_len=1000)
        streamed += out.report().new_text
        if out.finished:
            break
    return out, streamed


def test_stop_strings_cut_text_and_never_stream_a_partial_stop() -> None:
    out, streamed = _feed("hello wörld, stop here", SamplingParams(stop=["ld,", "xyz"]))
    assert out.finish_reason == "stop" and out.stop_reason == "ld,"
    assert out.text == streamed == "hello wör"
    kept, streamed = _feed("hello wörld, stop", SamplingParams(stop="ld,",
                                                               include_stop_str_in_output=True))
    assert kept.text == streamed == "hello wörld,"
    plain, streamed = _feed("no stop in here", SamplingParams(stop=["zz"], max_tokens=5))
    assert not plain.finished and streamed == plain.text[:-1] == "no stop in her"
    assert find_stop("abcabc", ["ca", "bc"], 3) == (2, "ca")


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -2), ("min_p", 1.5), ("repetition_penalty", 0.0), ("presence_penalty", 3.0),
    ("frequency_penalty", -2.5), ("n", 0), ("max_tokens", 0), ("logprobs", -1),
    ("seed", -5), ("stop", [""]), ("stop_token_ids", [-1]), ("temperature", "hot"),
    ("max_tokens", 2.5),
])
def test_sampling_params_validation(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field.split("_ids")[0]):
        SamplingParams(**{field: value})


def test_sampling_params_normalises() -> None:
    p = SamplingParams(stop="x", top_k=-1, temperature=0)
    assert p.stop == ["x"] and p.top_k == 0 and p.greedy and p.stop_token_ids == []
