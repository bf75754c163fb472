"""Every linear layer of a model shape, alone: how fast the native kernels run each format.

A decode step's time is its linears' plus the rest (the SSM state, the lm_head, norms, Python);
this isolates the first. For each --shapes (bench_quant's: ``bench``, hidden 512; ``1b``,
hidden 1536) it takes the shapes of every linear layer of the model but the lm_head (one
weight per layer and linear, as in the model, random, in huge pages as a loaded model's are),
in bf16 and quantized to fp8, int8 and int4 (groups of --group-size), and times one pass over
all of them at each --rows (1 to 3: one user's decode; 8: a batch) through the native kernels
(``bamba.native.quant_ops.quant_linear_rows``, the dense ``linear_ops.call_rows``), and at 512
rows (a prefill chunk) through what a prefill takes (``quant_ops.quant_linear_many``: integer
products for int8 and int4, bf16 products over dequantized panels for fp8; torch's matmul for
bf16) and, as ``fp8-tiles`` / ``int8-tiles`` / ``int4-tiles``, through the dequantized tiles
for torch's matmul that they took before those products; the formats in rotation (--rounds;
the median pass of --repeats per round, of --prefill-repeats at prefill rows, whose passes
take 0.3-3 s; the best round kept). Each linear
is one call of the library, past torch's dispatcher: the OpenMP team's start, paid each call,
still weighs on the bench shape's small linears, which the whole-model decode step runs inside
one call. Reported: ms a pass, GB/s of the weights' bytes (scales included), the speed-up over
bf16 (at prefill rows the weights' GB/s says little: those products are bound by arithmetic).

    python benchmarks/bench_quant_linears.py
    python benchmarks/bench_quant_linears.py --quick     # tiny shape: a smoke test

Writes benchmarks/results/quant_linears.json (--output).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_quant import SHAPES  # noqa: E402
from host import describe_host, write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "quant_linears.json"
FORMATS = ("bf16", "fp8", "int8", "int4")
TILES = ("fp8-tiles", "int8-tiles", "int4-tiles")  # prefill rows only: the dequantized tiles


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["bench", "1b"], choices=sorted(SHAPES))
    p.add_argument("--rows", nargs="+", type=int, default=[1, 2, 3, 8, 512])
    p.add_argument("--group-size", type=int, default=128, help="int4 group size")
    p.add_argument("--rounds", type=int, default=3, help="rotations over the formats")
    p.add_argument("--repeats", type=int, default=15, help="timed passes per round")
    p.add_argument("--prefill-repeats", type=int, default=3,
                   help="timed passes per round at more rows than the few-row kernels take")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny shape, 1 round, few passes")
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.rounds, args.repeats, args.group_size = ["tiny"], 1, 2, 16
        args.prefill_repeats = 2
    if min(args.rows) < 1 or min(args.rounds, args.repeats, args.prefill_repeats) < 1:
        p.error("--rows, --rounds, --repeats and --prefill-repeats must be >= 1")
    return args


def linear_shapes(shape: str) -> list[tuple[int, int]]:
    """(out, in) of every linear layer of the shape's model but the lm_head, in module order."""
    from bamba.config import preset
    from bamba.model import BambaLM

    name, overrides = SHAPES[shape]
    with torch.device("meta"):
        model = BambaLM(preset(name, **overrides))
    return [tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n != "lm_head"]


def in_huge_pages(tensor: torch.Tensor) -> torch.Tensor:
    from bamba.huge_pages import huge_page_buffer

    slot = huge_page_buffer(tensor.numel() * tensor.element_size())
    return slot.view(tensor.dtype).view(tensor.shape).copy_(tensor)


def passes(shapes: list[tuple[int, int]], group_size: int, rows: list[int]
           ) -> dict[str, tuple[int, dict[int, Callable[[], Any]]]]:
    """Per format: the weights' bytes and, per row count, one pass over all the linears."""
    from bamba.linear_protocol import LinearWeights
    from bamba.native import dispatch, quant_ops
    from bamba.native.linear_ops import call_rows
    from bamba.quant.formats import make_scheme, quantize

    generator = torch.Generator().manual_seed(0)
    inputs = {(m, k): torch.randn(m, k, generator=generator, dtype=torch.float32).bfloat16()
              for m in rows for _, k in shapes}
    layouts: dict[str, list[Any]] = {f: [] for f in FORMATS}
    for n, k in shapes:
        dense = torch.randn(n, k, generator=generator).mul_(0.02)
        layouts["bf16"].append(in_huge_pages(dense.bfloat16()))
        for fmt in FORMATS[1:]:
            tensors = quantize(dense, make_scheme(fmt, group_size if fmt == "int4" else None))
            weight = tensors.get("weight_packed", tensors.get("weight"))
            layout = quant_ops.quant_layout(LinearWeights(
                fmt, in_huge_pages(weight), None, in_huge_pages(tensors["weight_scale"])), k)
            if layout is None or not quant_ops.supported(layout):
                raise SystemExit(f"the native kernels do not take {fmt} at width {k} here")
            layouts[fmt].append(layout)

    def dense_pass(m: int) -> Callable[[], Any]:
        if m > dispatch.MAX_LINEAR_ROWS:
            return lambda: [torch.mm(inputs[m, w.shape[1]], w.t()) for w in layouts["bf16"]]
        return lambda: [call_rows(inputs[m, w.shape[1]], w, None) for w in layouts["bf16"]]

    def quant_pass(fmt: str, m: int) -> Callable[[], Any]:
        if m > dispatch.MAX_LINEAR_ROWS:
            return lambda: [quant_ops.quant_linear_many(inputs[m, q.k], q, None)
                            for q in layouts[fmt]]
        return lambda: [quant_ops.quant_linear_rows(inputs[m, q.k], q, None, False)
                        for q in layouts[fmt]]

    def tiles_pass(fmt: str, m: int) -> Callable[[], Any]:
        return lambda: [quant_ops.quant_linear_tiles(inputs[m, q.k], q, None)
                        for q in layouts[fmt]]

    out = {"bf16": (sum(w.numel() * 2 for w in layouts["bf16"]),
                    {m: dense_pass(m) for m in rows})}
    for fmt in FORMATS[1:]:
        size = sum(q.weight.numel() * q.weight.element_size()
                   + q.scales.numel() * q.scales.element_size() for q in layouts[fmt])
        out[fmt] = (size, {m: quant_pass(fmt, m) for m in rows})
    many = [m for m in rows if m > dispatch.MAX_LINEAR_ROWS]
    for name in TILES if many else ():
        out[name] = (out[name.split("-")[0]][0],
                     {m: tiles_pass(name.split("-")[0], m) for m in many})
    return out


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_shape(shape: str, args: argparse.Namespace) -> dict[str, Any]:
    from bamba.native.dispatch import MAX_LINEAR_ROWS

    shapes = linear_shapes(shape)
    by_format = passes(shapes, args.group_size, args.rows)
    best: dict[tuple[str, int], float] = {}
    for _ in range(args.rounds):
        for m in args.rows:
            for fmt, (_, fns) in by_format.items():
                if m in fns:
                    seconds = median_seconds(fns[m], args.repeats if m <= MAX_LINEAR_ROWS
                                             else args.prefill_repeats)
                    best[fmt, m] = min(best.get((fmt, m), seconds), seconds)
    rows = []
    for m in args.rows:
        for fmt, (size, _) in by_format.items():
            if (fmt, m) not in best:
                continue
            seconds = best[fmt, m]
            rows.append({"rows": m, "format": fmt, "ms": round(1e3 * seconds, 3),
                         "gb_per_s": round(size / seconds / 1e9, 1),
                         "vs_bf16": round(best["bf16", m] / seconds, 2), "weight_mb": round(
                             size / 2**20, 1)})
    return {"linears": len(shapes), "results": rows}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bamba.cores import in_passing_thread

    def run() -> dict[str, Any]:
        torch.set_num_threads(args.threads)
        report = {"benchmark": "every linear layer of a shape alone, per format",
                  "host": describe_host(quick=args.quick),
                  "settings": {"rows": args.rows, "group_size": args.group_size,
                               "rounds": args.rounds, "repeats": args.repeats,
                               "prefill_repeats": args.prefill_repeats,
                               "threads": args.threads},
                  "shapes": {}}
        for shape in args.shapes:
            report["shapes"][shape] = measure_shape(shape, args)
            for r in report["shapes"][shape]["results"]:
                print(f"{shape} rows {r['rows']} {r['format']:>10}: {r['ms']:8.3f} ms "
                      f"{r['gb_per_s']:6.1f} GB/s {r['vs_bf16']:5.2f}x bf16")
        return report

    report = in_passing_thread(run)  # the OpenMP pool on a passing thread, as the engine does
    write_json(args.output, report)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
