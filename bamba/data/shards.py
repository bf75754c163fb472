"""Arrow IPC shards of token-id lists, and the manifest that describes a tokenized dataset.

A shard is an Arrow IPC file with one column ``tokens`` of type list<uint32>, one row per
document. The manifest (``manifest.json``) lists the shards in order with their document and
token counts, the tokenizer's hash and the sources; it is rewritten atomically after every
finished shard, which is what makes ``bamba tokenize`` resumable.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "bamba-shards-v1"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; these are ordinary data files
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_shard(path: Path, docs: Sequence[Sequence[int]]) -> int:
    """Write token lists as one Arrow IPC file (atomically); return the number of tokens."""
    import pyarrow as pa

    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError(f"shard {path.name} would hold {offsets[-1]} tokens; lower --docs-per-shard")
    offsets = offsets.astype(np.int32)
    values = np.fromiter((t for d in docs for t in d), dtype=np.uint32, count=int(offsets[-1]))
    column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    table = pa.table({"tokens": column})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())
    return int(offsets[-1])


class ShardReader:
    """Random access to the documents of one shard, memory-mapped (opened on first use)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._offsets: np.ndarray | None = None
        self._values: np.ndarray | None = None

    def _open(self) -> None:
        import pyarrow as pa

        source = pa.memory_map(str(self.path), "r")
        column = pa.ipc.open_file(source).read_all().column("tokens").combine_chunks()
        self._offsets = column.offsets.to_numpy()
        self._values = column.values.to_numpy()

    def __len__(self) -> int:
        if self._offsets is None:
            self._open()
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        if self._offsets is None:
            self._open()
        return self._values[self._offsets[i]:self._offsets[i + 1]]

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers re-open their own map
        return {"path": self.path, "_offsets": None, "_values": None}


def load_manifest(directory: Path) -> dict[str, Any]:
    """Read and check a dataset directory's manifest."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no {MANIFEST} in {directory} (run `bamba tokenize` first)")
    manifest = read_json(path)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown format {manifest.get('format')!r}")
    if not manifest.get("complete"):
        raise ValueError(f"{path}: tokenization did not finish (rerun `bamba tokenize` to resume)")
    return manifest
