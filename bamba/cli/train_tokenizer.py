"""``bamba train-tokenizer INPUT... --vocab-size N --out DIR``: train a byte-level BPE tokenizer."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help=".txt/.py (one document per file), .jsonl, .parquet, or directories")
    parser.add_argument("--vocab-size", type=int, required=True,
                        help="ids in the vocabulary, special tokens included")
    parser.add_argument("--out", required=True, type=Path, help="directory for tokenizer.json")
    parser.add_argument("--text-field", default="text", help="JSONL field / parquet column")
    parser.add_argument("--min-frequency", type=int, default=2,
                        help="a pair must occur this often to be merged")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                        help="skip files whose path below a directory input matches (repeatable)")


def run(args: argparse.Namespace) -> int:
    from bamba.data.bpe import train_bpe

    stats = train_bpe(args.inputs, args.vocab_size, args.out, text_field=args.text_field,
                      min_frequency=args.min_frequency, exclude=args.exclude)
    log.info("trained on %d documents (skipped %d empty, %d not UTF-8); saved to %s",
             stats.documents, stats.empty, stats.invalid_utf8, args.out)
    return 0
