"""``python -m bamba.train CONFIG.yaml [--key=value ...]`` (what torchrun launches)."""

from __future__ import annotations

import logging
import os
import sys

from bamba.train.config import load_config
from bamba.train.trainer import train


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    try:
        result = train(load_config(argv[0], argv[1:]))
    except (ValueError, FileNotFoundError) as exc:
        print(f"bamba.train: error: {exc}", file=sys.stderr)
        return 2
    if rank == 0 and result.losses:
        last = max(result.losses)
        logging.getLogger("bamba.train").info("step %d: loss %.4f, %.0f tokens/s", last,
                                              result.losses[last], result.tokens_per_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
