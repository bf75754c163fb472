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

from bamba.files import plain_mode

MANIFEST = "manifest.json"
FORMAT = "bamba-shards-v1"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, plain_mode())  # mkstemp makes 0600; these are ordinary data files
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

        try:
            source = pa.memory_map(str(self.path), "r")
            column = pa.ipc.open_file(source).read_all().column("tokens").combine_chunks()
        except (OSError, pa.ArrowException, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"{self.path}: not a readable shard ({first})") from None
        if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)) or \
                not pa.types.is_integer(column.type.value_type):
            raise ValueError(f"{self.path}: not a readable shard (column tokens is "
                             f"{column.type}, expected lists of token ids)")
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
    """Read and check a dataset directory's manifest: its format, that it is complete, that
    every shard entry names a file of ``directory`` and that the counts add up."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no {MANIFEST} in {directory} (run `bamba tokenize` first)")
    try:
        manifest = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise ValueError(f"{path}: unknown format {found!r}")
    if not manifest.get("complete"):
        raise ValueError(f"{path}: tokenization did not finish (rerun `bamba tokenize` to resume)")
    entries = manifest.get("shards")
    if not isinstance(entries, list):
        raise ValueError(f"{path}: shards must be a list")
    for entry in entries:
        check_entry(path, entry)
    for key in ("documents", "tokens"):
        total = sum(e[key] for e in entries)
        if manifest.get(key) != total:
            raise ValueError(f"{path}: {key} is {manifest.get(key)!r} but its shards hold {total}")
    return manifest


def check_entry(manifest: Path, entry: Any) -> None:
    """ValueError unless ``entry`` is a shard entry whose file is a plain name (no directory
    part: a manifest cannot point outside its own directory) with whole counts."""
    if not isinstance(entry, dict):
        raise ValueError(f"{manifest}: shard entry {entry!r} is not a mapping")
    name = entry.get("file")
    if not is_plain_name(name):
        raise ValueError(f"{manifest}: shard file {name!r} is not a file name inside "
                         f"{manifest.parent}")
    for key in ("documents", "tokens"):
        value = entry.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{manifest}: shard {name} has {key} {value!r}")


def is_plain_name(name: Any) -> bool:
    """A file name with no directory part that is not hidden (".", "..", ".x")."""
    return (isinstance(name, str) and name != "" and not name.startswith(".")
            and "/" not in name and "\\" not in name and "\0" not in name)
