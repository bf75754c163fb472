"""The ``bamba`` command: one verb per life stage.

Each verb lives in its own module exposing ``configure(parser)`` and ``run(args) -> int``; only
the module of the verb being run is imported, so ``bamba --help`` stays fast and one verb's
heavy dependencies never slow another.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import NoReturn

# verb -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train-tokenizer": ("bamba.cli.train_tokenizer", "train a byte-level BPE tokenizer on text files"),
    "tokenize": ("bamba.cli.tokenize", "text/JSONL/parquet files -> Arrow shards of token ids"),
    "generate": ("bamba.cli.generate", "generate a continuation of a prompt"),
    "chat": ("bamba.cli.chat", "chat with a model in the terminal (chat template, streamed replies)"),
    "analyze": ("bamba.cli.analyze", "arithmetic-intensity model: FLOPs, bytes, predicted decode speed-up"),
    "train": ("bamba.cli.train", "pretrain from a YAML config (torchrun -m bamba.train for several processes)"),
    "finetune": ("bamba.cli.finetune", "fine-tune a checkpoint on chat or prompt/completion JSONL"),
    "demo": ("bamba.cli.demo", "offline demo: train a small hybrid on the stdlib's source, complete code"),
    "serve": ("bamba.cli.serve", "OpenAI-compatible HTTP server (continuous batching engine)"),
    "eval": ("bamba.cli.eval", "evaluate a model: PhoneBook retrieval, perplexity (JSON + PNG), "
                               "lm-evaluation-harness tasks"),
    "quantize": ("bamba.cli.quantize", "quantize a checkpoint's linear layers to fp8, int8 or int4 (compressed-tensors)"),
    "export-gguf": ("bamba.cli.export_gguf", "write a checkpoint as a GGUF file for llama.cpp"),
}


# verbs that size their thread pools with bamba.cores (measured before torch loads)
ADAPTS_THREADS = frozenset({"demo", "train", "finetune", "generate", "chat", "serve", "eval"})


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to every option whose help text does not already name its
    default; options without a value (flags, None) and positionals are left as they are."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        no_value = action.default is None or action.default is False \
            or action.default == argparse.SUPPRESS
        if "default" in text or no_value or not action.option_strings or action.nargs == 0:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class OneLineErrors(argparse.ArgumentParser):
    """Bad arguments as one line naming the command, exit code 2 (not argparse's usage block
    first); its subcommands' parsers are of this class too. ``commands``: the verbs' parsers."""

    commands: dict[str, argparse.ArgumentParser]  # set by build_parser on the top parser

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(verb: str | None = None) -> OneLineErrors:
    """The parser; only ``verb``'s module is imported (to add its arguments)."""
    parser = OneLineErrors(prog="bamba", description=__doc__.splitlines()[0])
    parser.commands = {}
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        verb_parser = sub.add_parser(name, help=help_text, description=help_text,
                                     formatter_class=DefaultsHelpFormatter)
        verb_parser.set_defaults(_module=module)
        parser.commands[name] = verb_parser
        if name == verb:
            importlib.import_module(module).configure(verb_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    if verb in ADAPTS_THREADS and not {"-h", "--help"} & set(argv):
        from bamba.cores import prepare

        prepare()
    parser = build_parser(verb)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the command they were given to, not by `bamba`
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (ValueError, FileNotFoundError) as exc:  # user errors: one line, no traceback
        print(f"bamba {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
