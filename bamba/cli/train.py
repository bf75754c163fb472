"""``bamba train CONFIG.yaml [--key=value ...]``: pretrain in this process.

For several processes: ``torchrun --nproc-per-node N -m bamba.train CONFIG.yaml [--key=value ...]``.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bamba.train.trainer import TrainResult


def configure(parser: argparse.ArgumentParser) -> None:
    from bamba.train.train_config import keys_help

    parser.add_argument("config", help="training config (YAML); see configs/")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, metavar="--key=value",
                        help="override config keys, e.g. --lr=1e-3 --steps 10 "
                             "--model_overrides.hidden_size=128")
    parser.epilog = keys_help()
    parser.formatter_class = _with_raw_epilog(parser.formatter_class)


def _with_raw_epilog(formatter: type[argparse.HelpFormatter]) -> type[argparse.HelpFormatter]:
    """``formatter`` that prints the epilog (the config keys) with its own line breaks."""

    class RawEpilog(formatter):  # type: ignore[misc, valid-type]
        def _fill_text(self, text: str, width: int, indent: str) -> str:
            return "".join(indent + line for line in text.splitlines(keepends=True))

    return RawEpilog


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from bamba.cores import choose_threads
    from bamba.train.train_config import load_config
    from bamba.train.trainer import train

    cfg = load_config(args.config, args.overrides)
    return report(train(replace(cfg, threads=choose_threads(cfg.threads))))


def report(result: "TrainResult") -> int:
    """Print the last loss, throughput and export directory of a finished run (rank 0 only)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if result.losses:
        last = max(result.losses)
        print(f"step {last}: loss {result.losses[last]:.4f}, {result.tokens_per_s:.0f} tokens/s")
    if result.export_dir is not None:
        print(f"exported {result.export_dir}")
    return 0
