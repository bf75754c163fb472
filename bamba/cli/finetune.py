"""``bamba finetune CONFIG.yaml [--key=value ...]``: supervised fine-tuning on chat or
prompt/completion JSONL (``data: sft``), loss on assistant tokens only, starting from
``init_from`` (an HF-layout checkpoint); same checkpoints, resume and export as ``bamba train``.
"""

from __future__ import annotations

import argparse

from bamba.cli.train import configure as configure  # same arguments as `bamba train`


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from bamba.cores import choose_threads
    from bamba.train.train_config import load_config
    from bamba.cli.train import report
    from bamba.train.trainer import train

    cfg = load_config(args.config, ["--data=sft", *args.overrides])
    if not cfg.init_from:
        raise ValueError("bamba finetune needs init_from (an HF-layout checkpoint directory)")
    return report(train(replace(cfg, threads=choose_threads(cfg.threads))))
