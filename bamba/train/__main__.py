"""``python -m bamba.train CONFIG.yaml [--key=value ...]`` (what torchrun launches): the same
arguments, help and one-line errors as ``bamba train``, with each log line naming its rank
(only rank 0 logs below WARNING)."""

from __future__ import annotations

import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    from bamba.cli import main as cli_main

    argv = sys.argv[1:] if argv is None else argv
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    return cli_main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main())
