"""Decode-step benchmark of bamba.native's layer kernels against the per-op torch path.

For each dtype and batch size: the median time of one greedy decode step of the whole model
(random weights, ContiguousCache, float32 SSM state) with the native layer steps
(``bamba.native.layer_ops``) and with them switched off (torch ops, with the few-row linear
kernel where it applies), interleaved in one process. This is what sets
``layer_ops.MAX_ROWS``. Writes benchmarks/results/native.json and prints a table.

    python benchmarks/bench_native.py                 # bench shape, bf16 + fp32
    python benchmarks/bench_native.py --quick         # tiny shape: a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from bamba.cache import ContiguousCache
from bamba.config import preset
from bamba.model import BambaLM, init_weights
from bamba.native import layer_ops

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


def step_seconds(model: BambaLM, batch: int, steps: int, native: bool) -> float:
    """Mean seconds per decode step over ``steps`` steps after a 2-step warm-up."""
    fits, max_rows = layer_ops.fits, layer_ops.MAX_ROWS
    if native:  # beyond MAX_ROWS too, to show where the threshold lies
        layer_ops.MAX_ROWS = max(batch, max_rows)
    else:
        layer_ops.fits = lambda *args: False
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
        layer_ops.fits, layer_ops.MAX_ROWS = fits, max_rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = preset(args.preset)
    rows = []
    for name in args.dtypes.split(","):
        model = init_weights(BambaLM(config), seed=0).to(getattr(torch, name)).eval()
        for batch in (int(b) for b in args.batches.split(",")):
            times: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(args.repeats):  # interleaved, so drift hits both alike
                for native in (True, False):
                    times[native].append(step_seconds(model, batch, args.steps, native))
            native_s, torch_s = (statistics.median(times[k]) for k in (True, False))
            rows.append({"dtype": name, "batch": batch, "native_ms": native_s * 1e3,
                         "torch_ms": torch_s * 1e3, "native_tok_s": batch / native_s,
                         "torch_tok_s": batch / torch_s, "speedup": torch_s / native_s,
                         "native_used": batch <= layer_ops.MAX_ROWS})
            r = rows[-1]
            print(f"{name:9s} b={batch:3d}  native {r['native_ms']:7.2f} ms "
                  f"({r['native_tok_s']:7.1f} tok/s)  torch {r['torch_ms']:7.2f} ms "
                  f"({r['torch_tok_s']:7.1f} tok/s)  x{r['speedup']:.2f}", flush=True)
    result = {"preset": args.preset, "threads": args.threads, "steps": args.steps,
              "repeats": args.repeats, "max_rows": layer_ops.MAX_ROWS,
              "note": "native = bamba.native layer steps (whole layers per call); torch = the "
                      "per-op path (few-row linear kernel up to 8 rows). Above max_rows the model "
                      "takes the torch path; 'native' is forced there only to show where the "
                      "threshold lies.",
              "load_average": os.getloadavg(), "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    partial = args.output.with_suffix(".tmp")
    partial.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(partial, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
