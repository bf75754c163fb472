"""``bamba demo``: train a small hybrid on the Python standard library, offline, and complete code.

Tokenizer -> shards -> training -> HF export -> greedy completion (see ``bamba.demo``); every
stage whose output exists is skipped, so a second run only generates.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", type=Path, default=None,
                        help="work directory (default: $BAMBA_DEMO_DIR or ~/.cache/bamba/demo; "
                             "`bamba generate` without --model uses DIR/train/hf of the default); "
                             "a run on another corpus or vocabulary size works in a subdirectory")
    parser.add_argument("--config", type=Path, default=None,
                        help="training config (default: stdlib-demo.yaml of the installed "
                             "package, bamba/configs/)")
    parser.add_argument("--prompt", default="def fibonacci(n):", help="text to complete")
    parser.add_argument("--max-new-tokens", type=int, default=48, metavar="N",
                        help="tokens to generate (greedy; fewer if the model ends the text)")
    parser.add_argument("--max-files", type=int, default=None, metavar="N",
                        help="use only the first N stdlib files (a quick run, in DIR/first-N-files)")
    parser.add_argument("--workers", type=int, default=2, help="tokenizer processes")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training config field (repeatable), e.g. --set steps=50; "
                             "`bamba train --help` lists the fields")


def run(args: argparse.Namespace) -> int:
    from bamba.demo import (DemoOptions, default_config_path, demo_dir, run_demo,
                            trained_checkpoint)

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    config = args.config or default_config_path()
    if not config.is_file():
        raise FileNotFoundError(f"{config}: no such config (pass --config)")
    opts = DemoOptions(root=(args.dir or demo_dir()).expanduser(), config=config,
                       overrides=tuple(f"--{item.removeprefix('--')}" for item in args.set), max_files=args.max_files,
                       workers=args.workers, prompt=args.prompt,
                       max_new_tokens=args.max_new_tokens)
    began = time.perf_counter()
    report = run_demo(opts)
    total = time.perf_counter() - began
    train = report.train
    print(f"\n{args.prompt}{report.completion}\n")
    print(f"corpus: {report.corpus_files} files, {report.corpus_tokens} tokens | model "
          f"{train['model']}: {train['steps']} steps of {train['batch_size']}x{train['seq_len']} "
          f"tokens, loss {train['first_loss']:.2f} -> {train['final_loss']:.2f}, "
          f"{train['median_tokens_per_s']:.0f} tokens/s")
    stages = ", ".join(f"{name} {secs:.0f} s" + (" (kept)" if name in report.skipped else "")
                       for name, secs in report.seconds.items())
    print(f"time: {total:.0f} s ({stages}) | checkpoint: {trained_checkpoint(opts.work_dir())}")
    return 0
