"""Data: text sources, tokenization into Arrow shards, and the stateful distributed loader.

Nothing here is imported by ``import bamba``; pyarrow (the ``data`` extra) loads only when
shards are written or read.
"""
