"""Dense bf16 prefill products: the library's panel product against torch's matmul.

At 9 to ~128 rows a bf16 linear layer is too many rows for the few-row decode kernels and too
few for torch's (oneDNN's) matmul to reach its peak with cold weights. This measures, bf16, the
bench shape (random weights: the cost does not depend on them), each way in turn:

- every linear layer of the model (lm_head aside) on R rows, one after another (the weights
  cold, as in a forward pass): ms and TFLOP/s;
- whole forward passes of R tokens after a --context-token prefill (each from the same restored
  states): ms, the prefill as a user meets it.

R = 9, 16, 32, 64, 128 and 256. The linears call the panel product directly at every R, so
their 256 shows why ``dispatch.MAX_GEMM_ROWS`` bounds it; a forward pass past that bound is
torch's both ways (its 256: the noise). Ways alternate round by round; the best is kept.

    python benchmarks/bench_prefill_products.py          # ~2 min on 2 cores
    python benchmarks/bench_prefill_products.py --quick  # tiny shape: smoke test
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bamba.cache import ContiguousCache
from bamba.config import preset
from bamba.model import BambaLM, init_weights
from bamba.native import accelerate, dispatch, linear_ops, steady_weights

sys.path.insert(0, str(Path(__file__).parent))
from host import describe_host, write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ROWS = (9, 16, 32, 64, 128, 256)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="bench")
    p.add_argument("--context", type=int, default=512, help="prefill before the timed passes")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny shape, one round: smoke test")
    p.add_argument("--output", type=Path, default=RESULTS / "prefill_products.json")
    return p.parse_args(argv)


def product(way: str) -> Callable[[torch.Tensor, torch.nn.Linear], torch.Tensor]:
    """x W^T (+ b) of one linear the given way: the panel product, or torch's matmul."""
    if way == "panel":
        return lambda x, m: linear_ops.gemm_rows(x, m.weight, m.bias)
    return lambda x, m: torch.nn.functional.linear(x, m.weight, m.bias)


def best_of(rounds: int, ways: tuple[str, ...], run: Callable[[str], float]) -> dict[str, float]:
    """The best seconds of ``run(way)`` for each way, the ways alternating round by round."""
    best: dict[str, float] = {}
    for _ in range(rounds):
        for way in ways:
            seconds = run(way)
            best[way] = min(best.get(way, seconds), seconds)
    return best


@torch.inference_mode()
def linears(model: BambaLM, rows: int, rounds: int) -> dict[str, Any]:
    """Every linear layer but the head on ``rows`` rows, one after another, both ways."""
    layers = [m for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and "lm_head" not in name]
    inputs = {m.in_features: torch.randn(rows, m.in_features, dtype=model.dtype) for m in layers}

    def run(way: str) -> float:
        f = product(way)
        start = time.perf_counter()
        for m in layers:
            f(inputs[m.in_features], m)
        return time.perf_counter() - start

    for way in ("panel", "torch"):  # warm-up
        run(way)
    best = best_of(rounds, ("panel", "torch"), run)
    flops = 2 * rows * sum(m.weight.numel() for m in layers)
    return {f"{way}_ms": round(s * 1e3, 2) for way, s in best.items()} | {
        f"{way}_tflops": round(flops / s / 1e12, 3) for way, s in best.items()} | {
        "speedup": round(best["torch"] / best["panel"], 3)}


@torch.inference_mode()
def forward_passes(model: BambaLM, rows: int, context: int, rounds: int) -> dict[str, Any]:
    """A forward pass of ``rows`` tokens after ``context`` ones, with and without the panel
    product (``dispatch.gemm_fits`` answering no)."""
    vocab = model.config.vocab_size
    cache = ContiguousCache(model.config, 1, context + rows, model.dtype)
    fits = dispatch.gemm_fits
    tokens = torch.randint(vocab, (1, rows))
    positions = torch.arange(context, context + rows)[None]
    with steady_weights():
        model(torch.randint(vocab, (1, context)), cache=cache.bind([0]), logits_to_keep=1)
        cache.checkpoint_states(0)

        def run(way: str) -> float:
            dispatch.gemm_fits = fits if way == "panel" else (lambda x, w: False)
            try:
                cache.restore_states(0)
                start = time.perf_counter()
                model(tokens, positions=positions, cache=cache.bind([0]), logits_to_keep=1)
                return time.perf_counter() - start
            finally:
                dispatch.gemm_fits = fits

        for way in ("panel", "torch"):  # warm-up
            run(way)
        best = best_of(rounds, ("panel", "torch"), run)
    return {f"{way}_ms": round(s * 1e3, 2) for way, s in best.items()} | {
        "speedup": round(best["torch"] / best["panel"], 3)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.shape, args.context, args.rounds = "tiny", 32, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = accelerate(init_weights(BambaLM(preset(args.shape))).to(torch.bfloat16).eval())
    if linear_ops.gemm_rows(torch.zeros(16, 64, dtype=torch.bfloat16),
                            torch.zeros(4, 64, dtype=torch.bfloat16), None) is None:
        print("the panel product is not built for this CPU (AVX-512 VNNI and BF16)")
        return 2
    rows = []
    for n in ROWS:
        row = {"rows": n, "linears": linears(model, n, args.rounds),
               "forward": forward_passes(model, n, args.context, args.rounds)}
        rows.append(row)
        lin, fwd = row["linears"], row["forward"]
        print(f"{n:4d} rows: linears {lin['panel_ms']:7.1f} ms panel, {lin['torch_ms']:7.1f} ms "
              f"torch ({lin['speedup']:.2f}x); forward {fwd['panel_ms']:7.1f} / "
              f"{fwd['torch_ms']:7.1f} ms ({fwd['speedup']:.2f}x)")
    result = {"host": describe_host(quick=args.quick), "shape": args.shape,
              "context": args.context, "rounds": args.rounds,
              "max_gemm_rows": dispatch.MAX_GEMM_ROWS, "rows": rows}
    write_json(args.output, result)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
