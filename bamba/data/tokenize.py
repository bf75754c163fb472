"""``bamba tokenize``: raw text -> Arrow shards of token ids + manifest.json.

The work is planned before anything is read: input files are listed deterministically, every
document slot (a file, a JSONL line, a parquet row) gets a global number, and shard k holds slots
[k*D, (k+1)*D). A shard's content therefore depends only on the inputs, the tokenizer and D —
never on the number of workers — and finished shards are recorded in the manifest so a rerun
skips them. Empty slots and undecodable ones are skipped and counted per shard.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import multiprocessing
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bamba.data import shards as shard_io
from bamba.data.sources import ReadStats, count_documents, list_input_files, read_documents

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TokenizeOptions:
    tokenizer_dir: Path
    out: Path
    docs_per_shard: int = 256
    text_field: str = "text"
    append_eos: bool = True
    strict_utf8: bool = False
    workers: int = 1
    exclude: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ShardTask:
    index: int
    pieces: tuple[tuple[str, int, int], ...]  # (file, first slot, end slot) in file order


def tokenizer_dir(path: str | os.PathLike) -> Path:
    """Accept a tokenizer directory or the path of its tokenizer.json."""
    path = Path(path)
    if path.is_file() and path.name.endswith(".json"):
        return path.parent
    if not path.exists():
        raise FileNotFoundError(f"no such tokenizer: {path}")
    return path


def plan_shards(files: Sequence[Path], docs_per_shard: int) -> tuple[list[dict[str, Any]], list[ShardTask]]:
    """Number every document slot and cut the sequence into shards of ``docs_per_shard`` slots."""
    if docs_per_shard < 1:
        raise ValueError(f"--docs-per-shard must be at least 1, got {docs_per_shard}")
    sources, tasks, pieces, filled = [], [], [], 0
    for path in files:
        slots = count_documents(path)
        sources.append({"path": str(path), "slots": slots, "bytes": path.stat().st_size})
        start = 0
        while start < slots:
            take = min(slots - start, docs_per_shard - filled)
            pieces.append((str(path), start, start + take))
            start, filled = start + take, filled + take
            if filled == docs_per_shard:
                tasks.append(ShardTask(len(tasks), tuple(pieces)))
                pieces, filled = [], 0
    if pieces:
        tasks.append(ShardTask(len(tasks), tuple(pieces)))
    return sources, tasks


_WORKER: dict[str, Any] = {}


def _init_worker(opts: TokenizeOptions) -> None:
    from bamba.tokenizer import load_tokenizer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER["tokenizer"] = load_tokenizer(opts.tokenizer_dir)
    _WORKER["opts"] = opts


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def _run_task(task: ShardTask) -> dict[str, Any]:
    """Tokenize one shard's documents and write the shard; return its manifest entry."""
    tok, opts = _WORKER["tokenizer"], _WORKER["opts"]
    stats, docs = ReadStats(), []
    eos = [tok.eos_token_id] if opts.append_eos else []
    for file, start, stop in task.pieces:
        texts = list(read_documents(Path(file), start, stop, text_field=opts.text_field,
                                    strict=opts.strict_utf8, stats=stats))
        docs.extend(ids + eos for ids in tok.encode_batch(texts, add_special_tokens=False))
    tokens = shard_io.write_shard(opts.out / shard_name(task.index), docs)
    return {"index": task.index, "file": shard_name(task.index), "documents": len(docs),
            "tokens": tokens, "empty": stats.empty, "invalid_utf8": stats.invalid_utf8}


def _plan_key(opts: TokenizeOptions, sources: list[dict[str, Any]], tok_hash: str) -> dict[str, Any]:
    return {"sources": sources, "tokenizer_sha256": tok_hash, "docs_per_shard": opts.docs_per_shard,
            "text_field": opts.text_field, "append_eos": opts.append_eos,
            "strict_utf8": opts.strict_utf8}


def _previous(out: Path, plan: dict[str, Any], n_shards: int) -> list[dict[str, Any] | None]:
    """Shard entries a previous run of the same plan finished (None where not done)."""
    path = out / shard_io.MANIFEST
    if not path.exists():
        return [None] * n_shards
    old = shard_io.read_json(path)
    if old.get("plan") != plan:
        raise ValueError(f"{out} holds a different tokenization (inputs, tokenizer or options "
                         "changed); write to another directory or delete this one")
    done = old.get("shards", [None] * n_shards)
    return [e if isinstance(e, dict) and shard_io.is_plain_name(e.get("file"))
            and (out / e["file"]).exists() else None for e in done]


def _manifest(plan: dict[str, Any], entries: list[dict[str, Any] | None], tok: Any) -> dict[str, Any]:
    finished = [e for e in entries if e is not None]
    return {"format": shard_io.FORMAT, "complete": len(finished) == len(entries),
            "plan": plan, "shards": entries,
            "tokenizer": {"sha256": plan["tokenizer_sha256"], "vocab_size": tok.vocab_size,
                          "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
            "documents": sum(e["documents"] for e in finished),
            "tokens": sum(e["tokens"] for e in finished),
            "skipped_empty": sum(e["empty"] for e in finished),
            "skipped_invalid_utf8": sum(e["invalid_utf8"] for e in finished)}


def tokenize_corpus(inputs: Sequence[str | os.PathLike], opts: TokenizeOptions,
                    progress: bool = False) -> dict[str, Any]:
    """Tokenize ``inputs`` into ``opts.out``; return the manifest. Resumes a previous run."""
    files = list_input_files(inputs, opts.exclude)
    if not files:
        raise ValueError(f"no {', '.join(('.txt', '.py', '.jsonl', '.parquet'))} files in "
                         f"{' '.join(map(str, inputs))}")
    _init_worker(opts)
    tok = _WORKER["tokenizer"]
    if opts.append_eos and tok.eos_token_id is None:
        raise ValueError(f"{opts.tokenizer_dir}: tokenizer has no eos_token; use --no-append-eos")
    tok_hash = hashlib.sha256((opts.tokenizer_dir / "tokenizer.json").read_bytes()).hexdigest()
    sources, tasks = plan_shards(files, opts.docs_per_shard)
    plan = _plan_key(opts, sources, tok_hash)
    opts.out.mkdir(parents=True, exist_ok=True)
    entries = _previous(opts.out, plan, len(tasks))
    todo = [t for t in tasks if entries[t.index] is None]
    log.info("%d files, %d shards, %d to do", len(files), len(tasks), len(todo))
    _execute(todo, opts, entries, plan, tok, progress)
    manifest = _manifest(plan, entries, tok)
    if manifest["documents"] == 0:
        raise ValueError(f"no documents in {len(files)} input files ({manifest['skipped_empty']} "
                         f"empty, {manifest['skipped_invalid_utf8']} not UTF-8)")
    return manifest


def _execute(todo: list[ShardTask], opts: TokenizeOptions, entries: list[dict[str, Any] | None],
             plan: dict[str, Any], tok: Any, progress: bool) -> None:
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="shard", disable=not progress, desc="tokenize")
    workers = max(1, min(opts.workers, len(todo)))
    pool = None
    if workers > 1:
        pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (opts,))
        results = pool.imap_unordered(_run_task, todo)
    else:
        results = map(_run_task, todo)
    try:
        for entry in results:
            entries[entry["index"]] = entry
            shard_io.write_json(opts.out / shard_io.MANIFEST, _manifest(plan, entries, tok))
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
