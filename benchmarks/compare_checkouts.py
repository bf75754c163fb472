"""Time the decode step of two checkouts of bamba in one alternating run.

Runs each checkout's own ``benchmarks/bench_native.py`` (with that checkout first on
PYTHONPATH) in turn, in the order before, after, after, before, ... so a drift in the machine's
speed hits both alike, then prints the median of each path's step time per checkout and their
ratio. Arguments after ``--`` go to bench_native.py.

    git worktree add ../bamba-before HEAD~1   # the commit to compare against
    python benchmarks/compare_checkouts.py --before ../bamba-before --after . --rounds 6 \\
        -- --dtypes bfloat16 --batches 1,8,32 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PATHS = ("model", "layers", "torch")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", type=Path, required=True, help="checkout timed as 'before'")
    p.add_argument("--after", type=Path, required=True, help="checkout timed as 'after'")
    p.add_argument("--rounds", type=int, default=6, help="runs of each checkout")
    p.add_argument("--output", type=Path, help="also write the medians here as JSON")
    args = p.parse_args(argv[:split])
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args, argv[split + 1:]


def run_once(checkout: Path, bench_args: list[str]) -> list[dict]:
    """One bench_native.py run of ``checkout``; its result rows."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "native.json"
        env = {**os.environ, "PYTHONPATH": str(checkout.resolve())}
        subprocess.run([sys.executable, str(checkout / "benchmarks" / "bench_native.py"),
                        *bench_args, "--output", str(out)], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["rows"]


def medians(runs: list[list[dict]]) -> dict[tuple[str, int, str], float]:
    """(dtype, batch, path) -> median step milliseconds over the runs."""
    times: dict[tuple[str, int, str], list[float]] = {}
    for rows in runs:
        for row in rows:
            for path in PATHS:
                times.setdefault((row["dtype"], row["batch"], path), []).append(row[f"{path}_ms"])
    return {key: statistics.median(values) for key, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    args, bench_args = parse_args(argv)
    runs: dict[str, list[list[dict]]] = {"before": [], "after": []}
    checkouts = {"before": args.before, "after": args.after}
    for i in range(args.rounds):
        for name in ("before", "after") if i % 2 == 0 else ("after", "before"):
            runs[name].append(run_once(checkouts[name], bench_args))
            print(f"round {i + 1}/{args.rounds}: {name} done", file=sys.stderr, flush=True)
    before, after = medians(runs["before"]), medians(runs["after"])
    print(f"{'dtype':9s} {'batch':>5s} {'path':6s} {'before ms':>10s} {'after ms':>10s} "
          f"{'after/before':>12s}")
    for key in sorted(before):
        print(f"{key[0]:9s} {key[1]:5d} {key[2]:6s} {before[key]:10.3f} {after[key]:10.3f} "
              f"{after[key] / before[key]:12.3f}")
    if args.output is not None:
        rows = [{"dtype": k[0], "batch": k[1], "path": k[2], "before_ms": before[k],
                 "after_ms": after[k]} for k in sorted(before)]
        partial = args.output.with_suffix(".tmp")
        partial.write_text(json.dumps({"before": str(args.before), "after": str(args.after),
                                       "rounds": args.rounds, "bench_args": bench_args,
                                       "rows": rows}, indent=2) + "\n")
        os.replace(partial, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
