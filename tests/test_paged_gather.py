"""The engine runner's paged KV write and gather against a direct per-row construction."""

import torch

from bamba.config import preset
from bamba.engine.page_pool import PoolPlan
from bamba.engine.runner import ModelRunner, PagedBatchCache, RowSpan, call_inputs
from bamba.model import BambaLM


def _cache(runner: ModelRunner, tables: list[list[int]], positions: list[int],
           scratch: bool) -> PagedBatchCache:
    """The cache of one decode call: row j writes position positions[j]."""
    inputs = call_inputs([RowSpan([0], p, t) for t, p in zip(tables, positions)],
                         max(positions) + 1, runner.block_size, torch.device("cpu"))
    return PagedBatchCache(runner.pools, None, inputs.write_rows, inputs.read_rows,
                           runner.scratch if scratch else None)


def test_gather_returns_each_rows_keys_in_order_for_ragged_rows() -> None:
    cfg = preset("tiny")
    model = BambaLM(cfg)
    runner = ModelRunner(model, PoolPlan(num_blocks=12, num_slots=2, block_bytes=0,
                                         slot_bytes=0), block_size=4, state_dtype=torch.float32)
    layer = cfg.attn_layer_indices[0]
    hkv, d = cfg.num_key_value_heads, cfg.head_dim
    gen = torch.Generator().manual_seed(0)
    tables = [[7, 2, 9], [4]]  # row 0 holds 10 tokens (positions 0..9), row 1 holds 3
    lengths = [10, 3]
    history = [torch.randn(n, 2, hkv, d, generator=gen) for n in lengths]  # (k, v) per token
    # Fill the pages through update_kv one position at a time (ragged: row 1 stops early).
    for pos in range(max(lengths)):
        live = [i for i, n in enumerate(lengths) if pos < n]
        cache = _cache(runner, [tables[i] for i in live], [pos] * len(live), scratch=pos % 2 == 0)
        kv = torch.stack([history[i][pos] for i in live])[:, None]  # [B, 1, 2, Hkv, D]
        positions = torch.full((len(live), 1), pos)
        keys, values = cache.update_kv(layer, kv[:, :, 0], kv[:, :, 1], positions)
        assert keys.shape == (len(live), pos + 1, hkv, d)
        for j, i in enumerate(live):
            torch.testing.assert_close(keys[j], history[i][:pos + 1, 0])
            torch.testing.assert_close(values[j], history[i][:pos + 1, 1])
    # Both rows at once: row 1's keys beyond its length come from padding and stay finite.
    cache = _cache(runner, tables, [10, 3], scratch=True)
    kv = torch.randn(2, 1, 2, hkv, d, generator=gen)
    keys, values = cache.update_kv(layer, kv[:, :, 0], kv[:, :, 1], torch.tensor([[10], [3]]))
    torch.testing.assert_close(keys[0, :10], history[0][:, 0])
    torch.testing.assert_close(values[1, :3], history[1][:, 1])
    torch.testing.assert_close(keys[1, 3], kv[1, 0, 0])
    assert keys.shape == (2, 11, hkv, d) and torch.isfinite(keys).all()


def test_call_inputs_equal_a_per_token_construction() -> None:
    """Ids, positions and page rows of chunks of equal length at different starts (block
    tables of different widths) equal what each row's blocks say token by token."""
    bs, rows = 4, [RowSpan([5, 6, 7], 9, [3, 8, 1]), RowSpan([1, 2, 3], 0, [6])]
    end = 12
    got = call_inputs(rows, end, bs, torch.device("cpu"))
    for j, row in enumerate(rows):
        span = range(row.start, row.start + 3)
        padded = row.blocks + [0] * 3
        assert got.ids[j].tolist() == row.tokens
        assert got.positions[j].tolist() == list(span)
        assert got.write_rows[j].tolist() == [row.blocks[p // bs] * bs + p % bs for p in span]
        assert got.read_rows[j].tolist() == [padded[p // bs] * bs + p % bs for p in range(end)]
