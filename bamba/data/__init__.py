"""Data: text sources, tokenization into Arrow shards, and the stateful distributed loader.

Nothing here is imported by ``import bamba``; pyarrow (the ``data`` extra) loads only when
shards are written or read.

Use (one rank of a run)::

    from bamba.data.documents import ShardDocuments, TextDocuments
    from bamba.data.loader import build_loader, read_states, write_state

    code = ShardDocuments("data/stdlib")                  # a `bamba tokenize` output directory
    raw = TextDocuments(["notes/"], "tokenizer/", name="notes")   # tokenized on the fly
    loader = build_loader([code, raw], weights=[0.8, 0.2], seq_len=512, batch_size=8,
                          seed=0, rank=rank, world_size=world, num_workers=2, shuffle_buffer=256)
    for batch in loader:        # endless; input_ids/labels/position_ids/seq_idx (B, L), doc_keys (B, L+1)
        ...
        write_state(ckpt_dir, loader.state_dict())        # each rank, at a checkpoint
    loader.load_state_dict(read_states(ckpt_dir))         # resume, same or different world/workers
"""
