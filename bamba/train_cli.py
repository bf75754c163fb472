"""``bamba train CONFIG.yaml [--key=value ...]``: pretrain in this process.

For several processes: ``torchrun --nproc-per-node N -m bamba.train CONFIG.yaml [--key=value ...]``.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bamba.train.trainer import TrainResult


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training config (YAML); see configs/")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, metavar="--key=value",
                        help="override config fields, e.g. --lr=1e-3 --model_overrides.hidden_size=128")


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from bamba.cores import choose_threads
    from bamba.train.config import load_config
    from bamba.train.trainer import train

    cfg = load_config(args.config, args.overrides)
    return report(train(replace(cfg, threads=choose_threads(cfg.threads))))


def report(result: "TrainResult") -> int:
    """Print the last loss, throughput and export directory of a finished run."""
    if result.losses:
        last = max(result.losses)
        print(f"step {last}: loss {result.losses[last]:.4f}, {result.tokens_per_s:.0f} tokens/s")
    if result.export_dir is not None:
        print(f"exported {result.export_dir}")
    return 0
