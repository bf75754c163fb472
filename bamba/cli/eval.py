"""``bamba eval SUBCOMMAND``: evaluations that write a JSON result and a PNG plot.

Each subcommand lives in its own module exposing ``configure(parser)`` and ``run(args)``; adding
one is one line in ``SUBCOMMANDS``. Their modules import only argparse-level code at the top, so
configuring all of them for ``--help`` stays fast. The helpers below are what they share: the
model options, ``--rope-scaling`` parsing, loading, and where results go.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Any

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "phonebook": ("bamba.cli.eval_phonebook",
                  "PhoneBook retrieval accuracy per context length (through the engine)"),
    "perplexity": ("bamba.cli.eval_perplexity",
                   "perplexity of text, JSONL or token shards, overall and by position"),
    "lm-eval": ("bamba.cli.eval_harness", "lm-evaluation-harness tasks on a bamba model, in process"),
}


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", metavar="SUBCOMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text,
                                    formatter_class=parser.formatter_class)
        sub_parser.set_defaults(_eval_module=module)
        importlib.import_module(module).configure(sub_parser)


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(args._eval_module).run(args) or 0)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL, --tokenizer, --dtype, --threads, --out: what every evaluation takes."""
    from bamba.cli.inference_options import add_model_options

    parser.add_argument("model", metavar="MODEL", help="checkpoint directory or hub id")
    add_model_options(parser, rope_scaling=False)  # each evaluation has its own
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch threads (default: one per core, fewer on busy cores)")
    parser.add_argument("--out", default="eval-results", metavar="DIR",
                        help="directory for the JSON result and the PNG plot")


def parse_rope_scaling(text: str) -> dict[str, Any] | None:
    """A ``--rope-scaling`` value: ``none`` / ``null`` for the checkpoint's own RoPE, else what
    generate and serve accept (``inference_options.rope_scaling_option``)."""
    from bamba.cli.inference_options import rope_scaling_option

    if text.strip().lower() in ("none", "null"):
        return None
    return rope_scaling_option(text)


def checkpoint_config(model_ref: str) -> Any:
    """The checkpoint's (or GGUF file's) ``BambaConfig``, read without loading weights."""
    from bamba.checkpoint import config_of

    return config_of(model_ref)


def check_context(needed: int, limit: int, what: str, scaled: bool) -> None:
    """ValueError when ``needed`` tokens exceed the model's context of ``limit`` tokens."""
    if needed > limit:
        hint = "" if scaled else "; extend it with --rope-scaling"
        raise ValueError(f"{what} needs {needed} tokens, beyond this model's context of "
                         f"{limit} tokens{hint}")


def load_model(args: argparse.Namespace, rope_scaling: dict[str, Any] | None = None) -> Any:
    """The checkpoint at ``args.model`` in ``args.dtype``, with ``rope_scaling`` over its own
    RoPE when given (a bad one is the loader's one-line ValueError)."""
    from bamba.checkpoint import from_pretrained
    from bamba.dtypes import parse_dtype

    return from_pretrained(args.model, dtype=parse_dtype(args.dtype, "--dtype"),
                           rope_scaling=rope_scaling)


def load_tokenizer(args: argparse.Namespace) -> Any:
    from bamba.cli.inference_options import checkpoint_tokenizer

    return checkpoint_tokenizer(args.model, args.tokenizer)


def prepare(args: argparse.Namespace) -> None:
    """Checks every evaluation makes before loading anything: dtype, --out, threads."""
    from bamba.cli.inference_options import set_threads
    from bamba.dtypes import parse_dtype

    parse_dtype(args.dtype, "--dtype")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file, not a directory")
    set_threads(args.threads)


def short_name(model_ref: str) -> str:
    """A checkpoint's name for a plot title: its last two path parts (a hub id as it is)."""
    return "/".join(Path(model_ref).parts[-2:])


def write_results(out: str, name: str, result: dict[str, Any]) -> Path:
    """``DIR/name.json``, written atomically; returns its path."""
    from bamba.data.shards import write_json

    path = Path(out) / f"{name}.json"
    write_json(path, result)
    return path
