"""Raw text sources: .txt and .py files (one document per file), .jsonl (one document per line,
a text field) and .parquet (a text column), or directories of them.

Directories are walked recursively and their files sorted by relative path, so the document order
is deterministic. Empty documents (nothing but whitespace) are skipped and counted. Text that is
not valid UTF-8 is skipped and counted with a warning naming the file (``strict=True`` makes it
an error naming the file instead): the demo corpus, Python's standard library, holds a few
deliberately mis-encoded test files.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".py", ".jsonl", ".parquet")
WHOLE_FILE = (".txt", ".py")


@dataclasses.dataclass
class ReadStats:
    """What reading skipped: empty documents and documents that were not valid UTF-8."""

    documents: int = 0
    empty: int = 0
    invalid_utf8: int = 0

    def add(self, other: "ReadStats") -> None:
        self.documents += other.documents
        self.empty += other.empty
        self.invalid_utf8 += other.invalid_utf8


def list_input_files(inputs: Sequence[str | os.PathLike], exclude: Sequence[str] = ()) -> list[Path]:
    """Expand files and directories into a deterministic list of supported files.

    ``exclude`` holds glob patterns matched against paths relative to a directory input
    (e.g. ``site-packages/*``).
    """
    files: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"no such file or directory: {path}")
        if path.is_dir():
            found = {p.relative_to(path).as_posix(): p for p in path.rglob("*")
                     if p.suffix in SUFFIXES and p.is_file()}
            files.extend(found[rel] for rel in sorted(found)
                         if not any(fnmatch.fnmatch(rel, pat) for pat in exclude))
        elif path.suffix in SUFFIXES:
            files.append(path)
        else:
            raise ValueError(f"unsupported input {path}: expected one of {', '.join(SUFFIXES)}")
    return files


def count_documents(path: Path) -> int:
    """Number of document slots in a file (before empty ones are skipped)."""
    if path.suffix in WHOLE_FILE:
        return 1
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    raise ValueError(f"unsupported input {path}")


def _decode(raw: bytes, where: str, strict: bool, stats: ReadStats) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if strict:
            raise ValueError(f"{where} is not valid UTF-8 (byte {exc.start})") from None
        log.debug("skipping %s: not valid UTF-8 (byte %d)", where, exc.start)
        stats.invalid_utf8 += 1
        return None
    return _keep(text, stats)


def _keep(text: str | None, stats: ReadStats) -> str | None:
    if text is None or not text.strip():
        stats.empty += 1
        return None
    stats.documents += 1
    return text


def _jsonl_text(line: bytes, where: str, field: str, strict: bool, stats: ReadStats) -> str | None:
    text = _decode(line, where, strict, stats)
    if text is None:
        return None
    stats.documents -= 1  # _decode counted the raw line; count the field below instead
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: invalid JSON ({exc.msg})") from None
    if not isinstance(record, dict) or field not in record:
        raise ValueError(f"{where}: no field {field!r}")
    value = record[field]
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} is not a string")
    return _keep(value, stats)


def read_documents(path: Path, start: int = 0, stop: int | None = None, *, text_field: str = "text",
                   strict: bool = False, stats: ReadStats | None = None) -> Iterator[str]:
    """Yield the non-empty documents in slots [start, stop) of one file."""
    stats = stats if stats is not None else ReadStats()
    if path.suffix in WHOLE_FILE:
        if start == 0 and (stop is None or stop > 0):
            text = _decode(path.read_bytes(), str(path), strict, stats)
            if text is not None:
                yield text
    elif path.suffix == ".jsonl":
        yield from _read_jsonl(path, start, stop, text_field, strict, stats)
    elif path.suffix == ".parquet":
        yield from _read_parquet(path, start, stop, text_field, stats)
    else:
        raise ValueError(f"unsupported input {path}")


def _read_jsonl(path: Path, start: int, stop: int | None, field: str, strict: bool,
                stats: ReadStats) -> Iterator[str]:
    slot = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if stop is not None and slot >= stop:
                return
            if slot >= start:
                text = _jsonl_text(line, f"{path}:{lineno}", field, strict, stats)
                if text is not None:
                    yield text
            slot += 1


def _read_parquet(path: Path, start: int, stop: int | None, column: str,
                  stats: ReadStats) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if column not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no column {column!r}")
    kind = pf.schema_arrow.field(column).type
    if str(kind) not in ("string", "large_string"):
        raise ValueError(f"{path}: column {column!r} is {kind}, not text")
    stop = pf.metadata.num_rows if stop is None else stop
    slot = 0
    for group in range(pf.num_row_groups):
        rows = pf.metadata.row_group(group).num_rows
        if slot + rows > start and slot < stop:
            values = pf.read_row_group(group, columns=[column]).column(column).to_pylist()
            for i, value in enumerate(values, slot):
                if start <= i < stop:
                    text = _keep(value, stats)
                    if text is not None:
                        yield text
        slot += rows
