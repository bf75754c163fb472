"""Decode-step benchmark of bamba.native's decode kernels against the per-op torch path.

For each dtype and batch size: the median time of one decode step of the whole model (random
weights in one huge-page buffer, ContiguousCache, float32 SSM state) three ways, interleaved
in one process:

* model:  every layer in one native call (``bamba.native.decode_ops``, what the model runs);
* layers: one native call per layer (``layer_ops``), rope, cache and attention in torch;
* torch:  the per-op torch path (with the few-row linear kernel where it applies).

This is what sets ``dispatch.MAX_ROWS``. Writes benchmarks/results/native.json and prints a
table.

    python benchmarks/bench_native.py                 # bench shape, bf16 + fp32
    python benchmarks/bench_native.py --quick         # tiny shape: a smoke test
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from bamba.arena import pack_weights
from bamba.cache import ContiguousCache
from bamba.config import preset
from bamba.model import BambaLM, init_weights
from bamba.native import accelerate, dispatch

sys.path.insert(0, str(Path(__file__).parent))
from host import describe_host, write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "native.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="bench")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--batches", default="1,2,4,8,16,32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny preset, batches 1,2, 2 repeats")
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.batches, args.repeats, args.steps = "tiny", "1,2", 2, 4
    return args


PATHS = ("model", "layers", "torch")


def step_seconds(model: BambaLM, batch: int, steps: int, path: str) -> float:
    """Mean seconds per decode step over ``steps`` steps after a 2-step warm-up."""
    fits, max_rows, fused = dispatch.layer_fits, dispatch.MAX_ROWS, dispatch.decode_step_fits
    if path != "torch":  # beyond MAX_ROWS too, to show where the threshold lies
        dispatch.MAX_ROWS = max(batch, max_rows)
    if path == "layers":
        dispatch.decode_step_fits = lambda *args: False
    if path == "torch":
        dispatch.layer_fits = lambda *args: False
    try:
        cache = ContiguousCache(model.config, batch, steps + 2, model.dtype)
        tokens = torch.randint(0, model.config.vocab_size, (batch, 1),
                               generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            for i in range(2):
                model(tokens, positions=torch.full((batch, 1), i), cache=cache)
            start = time.perf_counter()
            for i in range(2, steps + 2):
                model(tokens, positions=torch.full((batch, 1), i), cache=cache)
            return (time.perf_counter() - start) / steps
    finally:
        dispatch.layer_fits, dispatch.MAX_ROWS = fits, max_rows
        dispatch.decode_step_fits = fused


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = preset(args.preset)
    rows = []
    for name in args.dtypes.split(","):
        model = init_weights(BambaLM(config), seed=0).to(getattr(torch, name)).eval()
        model = accelerate(pack_weights(model))
        for batch in (int(b) for b in args.batches.split(",")):
            times: dict[str, list[float]] = {path: [] for path in PATHS}
            for _ in range(args.repeats):  # interleaved, so drift hits all alike
                for path in PATHS:
                    times[path].append(step_seconds(model, batch, args.steps, path))
            ms = {path: statistics.median(times[path]) * 1e3 for path in PATHS}
            rows.append({"dtype": name, "batch": batch,
                         **{f"{path}_ms": ms[path] for path in PATHS},
                         **{f"{path}_tok_s": batch / ms[path] * 1e3 for path in PATHS},
                         "model_vs_layers": ms["layers"] / ms["model"],
                         "model_vs_torch": ms["torch"] / ms["model"],
                         "native_used": batch <= dispatch.MAX_ROWS})
            print(f"{name:9s} b={batch:3d}  " + "  ".join(
                f"{path} {ms[path]:7.2f} ms ({batch / ms[path] * 1e3:7.1f} tok/s)"
                for path in PATHS) + f"  x{rows[-1]['model_vs_torch']:.2f} vs torch", flush=True)
    result = {"preset": args.preset, "threads": args.threads, "steps": args.steps,
              "repeats": args.repeats, "max_rows": dispatch.MAX_ROWS,
              "note": "model = every layer in one native call (bamba.native.decode_ops); layers = "
                      "one native call per layer; torch = the per-op path (few-row linear "
                      "kernel up to 8 rows). Above max_rows the model takes the torch path; the "
                      "native paths are forced there only to show where the threshold lies.",
              "load_average": os.getloadavg(), "host": describe_host(quick=args.quick),
              "rows": rows}
    write_json(args.output, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
