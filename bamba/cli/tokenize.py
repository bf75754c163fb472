"""``bamba tokenize INPUT... --tokenizer DIR --out DIR``: text/JSONL/parquet -> Arrow token shards."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help=".txt/.py (one document per file), .jsonl, .parquet, or directories")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory or its tokenizer.json")
    parser.add_argument("--out", required=True, type=Path, help="output directory (shards + manifest)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    parser.add_argument("--docs-per-shard", type=int, default=256,
                        help="documents per Arrow shard (the unit of parallel work and resume)")
    parser.add_argument("--text-field", default="text", help="JSONL field / parquet column")
    parser.add_argument("--append-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="end every document with the eos token (default: yes)")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                        help="skip files whose path below a directory input matches (repeatable)")
    parser.add_argument("--strict-utf8", action="store_true",
                        help="fail on text that is not UTF-8 (default: skip it and count it)")


def run(args: argparse.Namespace) -> int:
    from bamba.data.tokenize import TokenizeOptions, tokenize_corpus, tokenizer_dir

    opts = TokenizeOptions(tokenizer_dir=tokenizer_dir(args.tokenizer), out=args.out,
                           docs_per_shard=args.docs_per_shard, text_field=args.text_field,
                           append_eos=args.append_eos, strict_utf8=args.strict_utf8,
                           workers=args.workers, exclude=tuple(args.exclude))
    m = tokenize_corpus(args.inputs, opts, progress=True)
    log.info("%s: %d documents, %d tokens in %d shards (skipped %d empty, %d not UTF-8)",
             args.out, m["documents"], m["tokens"], len(m["shards"]), m["skipped_empty"],
             m["skipped_invalid_utf8"])
    return 0
