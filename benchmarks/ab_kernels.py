"""Two builds of the native kernels in one process: a git revision's (--base, default HEAD)
against the working tree's, decode steps (batch 1 unless --batch) of each checkpoint in
alternating turns, or with --prefill N one prefill of N tokens a turn.

Why: a host of this machine kind moves its memory speed by up to ±30% within minutes, so two
processes a few minutes apart measure two spells, not two kernels (a change once looked +30%
in two such runs and 0% in three more). Here both builds are loaded side by side (ctypes, each
its own copy of the library) and every turn of --steps decode steps runs on one of them, the
first of each pair of turns alternating; each checkpoint's figure is each build's median over
its turns of a turn's median step, and their ratio. Only the kernels differ: the Python above
them is the working tree's.

    python benchmarks/ab_kernels.py DIR_OR_GGUF...                 # HEAD against the tree
    python benchmarks/ab_kernels.py --base 309dee0 --turns 60 DIR_OR_GGUF...
    python benchmarks/ab_kernels.py --prefill 512 --turns 10 DIR_OR_GGUF...

Prints one JSON line per checkpoint and, with --out, writes them all (with the host).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from bamba.native import library

sys.path.insert(0, str(Path(__file__).parent))
from host import describe_host, write_json  # noqa: E402
from measure import decode_seconds, prefill_seconds  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NATIVE = "bamba/native"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", help="checkpoint directories or GGUF files")
    p.add_argument("--base", default="HEAD", help="the git revision whose kernels are 'base'")
    p.add_argument("--turns", type=int, default=40, help="turns a build, per checkpoint")
    p.add_argument("--steps", type=int, default=10, help="decode steps a turn (2 untimed)")
    p.add_argument("--batch", type=int, default=1, help="rows a decode step")
    p.add_argument("--prefill", type=int, default=0,
                   help="time a prefill of this many tokens a turn instead of decode steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="JSON report")
    args = p.parse_args(argv)
    if args.turns < 2 or args.steps < 3 or args.batch < 1 or args.prefill < 0:
        p.error("--turns must be >= 2, --steps >= 3, --batch >= 1 and --prefill >= 0")
    return args


def revision_sources(revision: str, directory: Path) -> tuple[Path, ...]:
    """The kernels' C sources and headers of ``revision`` written into ``directory``."""
    names = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", revision,
                            f"{NATIVE}/"], capture_output=True, text=True, check=True).stdout
    paths = []
    for name in names.split():
        if name.endswith((".c", ".h")):
            path = directory / Path(name).name
            path.write_bytes(subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:{name}"],
                                            capture_output=True, check=True).stdout)
            paths.append(path)
    if not paths:
        raise ValueError(f"{revision}: no kernel sources under {NATIVE}/")
    return tuple(sorted(paths))


def decode_turns(model: Any, builds: dict[str, Any], turns: int, steps: int,
                 batch: int = 1, prefill: int = 0) -> dict[str, float]:
    """Median over turns of each build's median decode step (``measure.decode_seconds``: two
    untimed steps, then ``steps`` - 2), or with ``prefill`` of its prefill of that many tokens,
    the turns alternating between the builds."""
    times: dict[str, list[float]] = {name: [] for name in builds}
    real_load = library.load
    try:
        for turn in range(turns):
            for name in list(builds) if turn % 2 == 0 else list(reversed(builds)):
                library.load = lambda lib=builds[name]: lib  # noqa: E731
                times[name].append(prefill_seconds(model, prefill) if prefill else
                                   decode_seconds(model, batch, steps - 2))
    finally:
        library.load = real_load
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from bamba.checkpoint import from_pretrained
    from bamba.native import accelerate

    host = describe_host() if args.out else None  # matmul peak, read bandwidth beside figures
    with tempfile.TemporaryDirectory() as tmp:
        builds = {"base": library.open_library(library.build(revision_sources(args.base,
                                                                              Path(tmp)))),
                  "tree": library.open_library(library.build())}
    rows = []
    for checkpoint in args.checkpoints:
        model = accelerate(from_pretrained(checkpoint, dtype=torch.bfloat16).eval())
        seconds = decode_turns(model, builds, args.turns, args.steps, args.batch, args.prefill)
        row = {"checkpoint": checkpoint,
               **({"prefill": args.prefill} if args.prefill else {"batch": args.batch}),
               "base_ms": round(1e3 * seconds["base"], 3),
               "tree_ms": round(1e3 * seconds["tree"], 3),
               "base_over_tree": round(seconds["base"] / seconds["tree"], 3)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out is not None:
        write_json(args.out, {"benchmark": "kernels of two builds, alternating decode turns",
                              "base": args.base, "host": host,
                              "settings": vars(args) | {"out": str(args.out)}, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
