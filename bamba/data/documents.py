"""Random-access document collections the loader draws from: pre-tokenized shards, or raw text
tokenized on the fly. Both expose ``name``, ``len()`` and ``tokens(i) -> np.ndarray``."""

from __future__ import annotations

import bisect
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bamba.data.shards import MANIFEST, ShardReader, load_manifest
from bamba.data.sources import WHOLE_FILE, ReadStats, count_documents, list_input_files, read_documents

log = logging.getLogger(__name__)


class DocumentSource(Protocol):
    name: str

    def __len__(self) -> int: ...

    def tokens(self, index: int) -> np.ndarray: ...


class ShardDocuments:
    """The documents of a ``bamba tokenize`` output directory, addressed 0..N-1 in shard order."""

    def __init__(self, directory: str | os.PathLike, name: str | None = None) -> None:
        directory = Path(directory)
        manifest = load_manifest(directory)
        entries = [e for e in manifest["shards"] if e["documents"] > 0]
        self.name = name or directory.name
        self.readers = [ShardReader(directory / e["file"]) for e in entries]
        for entry, reader in zip(entries, self.readers):
            if len(reader) != entry["documents"]:
                raise ValueError(f"{directory / MANIFEST}: shard {entry['file']} holds "
                                 f"{len(reader)} documents, the manifest says {entry['documents']}")
        self.starts = np.cumsum([0] + [e["documents"] for e in entries]).tolist()
        self.num_tokens = int(manifest["tokens"])
        self.tokenizer = manifest["tokenizer"]

    def __len__(self) -> int:
        return self.starts[-1]

    def tokens(self, index: int) -> np.ndarray:
        shard = bisect.bisect_right(self.starts, index) - 1
        return self.readers[shard][index - self.starts[shard]]


def _jsonl_offsets(path: Path) -> np.ndarray:
    """Byte offsets of the non-blank lines of a JSONL file (one slot each)."""
    offsets, pos = [], 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                offsets.append(pos)
            pos += len(line)
    return np.asarray(offsets, dtype=np.int64)


class TextDocuments:
    """Raw .txt/.py/.jsonl/.parquet documents, tokenized when drawn (on-the-fly tokenization).

    Slots that are empty or not UTF-8 give zero tokens (the loader skips them), matching what
    ``bamba tokenize`` skips. JSONL files keep one byte offset per line in memory.
    """

    def __init__(self, inputs: Sequence[str | os.PathLike], tokenizer_dir: str | os.PathLike, *,
                 name: str = "text", text_field: str = "text", append_eos: bool = True,
                 exclude: Sequence[str] = ()) -> None:
        self.files = list_input_files(inputs, exclude)
        if not self.files:
            raise ValueError(f"no .txt/.py/.jsonl/.parquet files in {' '.join(map(str, inputs))}")
        self.name, self.text_field, self.append_eos = name, text_field, append_eos
        self.tokenizer_dir = Path(tokenizer_dir)
        self.starts = np.cumsum([0] + [count_documents(p) for p in self.files]).tolist()
        self._tok: Any = None
        self._jsonl: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self) -> dict[str, Any]:  # workers load their own tokenizer
        return {**self.__dict__, "_tok": None}

    def text(self, index: int) -> str | None:
        f = bisect.bisect_right(self.starts, index) - 1
        path, slot = self.files[f], index - self.starts[f]
        if path.suffix == ".jsonl":
            return self._jsonl_text(f, slot)
        docs = list(read_documents(path, slot, slot + 1, text_field=self.text_field,
                                   stats=ReadStats()))
        assert path.suffix in WHOLE_FILE or path.suffix == ".parquet"
        return docs[0] if docs else None

    def _jsonl_text(self, f: int, slot: int) -> str | None:
        if f not in self._jsonl:
            self._jsonl[f] = _jsonl_offsets(self.files[f])
        with open(self.files[f], "rb") as fh:
            fh.seek(int(self._jsonl[f][slot]))
            line = fh.readline()
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            log.debug("skipping %s slot %d: not valid UTF-8", self.files[f], slot)
            return None
        try:
            value = json.loads(text).get(self.text_field)
        except (json.JSONDecodeError, AttributeError):
            raise ValueError(f"{self.files[f]}: line of slot {slot} is not a JSON object") from None
        return value if isinstance(value, str) and value.strip() else None

    def tokens(self, index: int) -> np.ndarray:
        if self._tok is None:
            from bamba.tokenizer import load_tokenizer

            self._tok = load_tokenizer(self.tokenizer_dir)
        text = self.text(index)
        if text is None:
            return np.zeros(0, dtype=np.int64)
        ids = self._tok.encode(text, add_special_tokens=False)
        if self.append_eos and self._tok.eos_token_id is not None:
            ids.append(self._tok.eos_token_id)
        return np.asarray(ids, dtype=np.int64)
