"""Mixed steps benchmark: the engine with and without ``mixed_step_tokens``, in one process.

A closed loop at each concurrency C (default 4 and 8): C requests in flight on one ``LLM``
(random-weight --preset model, bf16), each a random --prompt-tokens prompt generating a length
drawn from --max-tokens x (1 -/+ 0.5); when one finishes the next is added between two steps,
as a server's arrivals are, so newcomers' prompts are prefilled while others decode. Per
setting: output tok/s, time to first token p50/p99, inter-token latency p50/p99 (the gap
between two steps that gave one request a token) and the number of steps. The settings run in
rotation --rounds times on the same model and prompts (the host drifts by 10-20% over
minutes; every round is reported, and the best of each setting).

This is the in-process view of what ``bench_serve.py`` measures through HTTP: whether cutting
a newcomer's prompt into chunks that ride beside the decoding rows (one native call a step)
keeps the inter-token p99 near its p50, and what it costs in throughput and first tokens.

    python benchmarks/bench_mixed_steps.py                  # bench shape, C = 4 and 8
    python benchmarks/bench_mixed_steps.py --quick          # tiny shape: a smoke test

Writes benchmarks/results/mixed_steps.json (--out).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bamba.config import preset
from bamba.cores import in_passing_thread
from bamba.engine import LLM, SamplingParams
from bamba.model import BambaLM, cast, init_weights

sys.path.insert(0, str(Path(__file__).parent))
from host import describe_host, write_json  # noqa: E402
from measure import percentile  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "mixed_steps.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="bench")
    p.add_argument("--concurrency", type=int, nargs="+", default=[4, 8])
    p.add_argument("--requests", type=int, default=None, help="per level (default 5 x C)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--settings", nargs="+", default=["0", "16"],
                   help="mixed_step_tokens values compared (0: no cut)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny preset, few requests, 1 round")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.concurrency, args.rounds = "tiny", [4], 1
        args.requests, args.prompt_tokens, args.max_tokens = 8, 24, 8
    return args


def closed_loop(llm: LLM, requests: list[tuple[list[int], int]], concurrency: int
                ) -> dict[str, Any]:
    """``concurrency`` requests in flight until all are done; the level's figures."""
    pending, sent, last = list(requests), {}, {}
    gaps: list[float] = []
    ttft: list[float] = []

    def add() -> None:
        prompt, n = pending.pop(0)
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        sent[llm.add_request(prompt, params)] = time.perf_counter()

    for _ in range(min(concurrency, len(pending))):
        add()
    start, tokens, steps = time.perf_counter(), 0, 0
    while llm.has_unfinished_requests():
        outputs = llm.step()
        now = time.perf_counter()
        steps += 1
        for out in outputs:
            (gaps.append(now - last[out.request_id]) if out.request_id in last
             else ttft.append(now - sent[out.request_id]))
            last[out.request_id] = now
            if out.finished:
                tokens += len(out.outputs[0].token_ids)
                if pending:
                    add()
    wall = time.perf_counter() - start
    return {"output_tok_per_s": round(tokens / wall, 1), "steps": steps,
            "ttft_p50_s": round(percentile(ttft, 50), 3),
            "ttft_p99_s": round(percentile(ttft, 99), 3),
            "itl_p50_ms": round(percentile(gaps, 50) * 1e3, 1),
            "itl_p99_ms": round(percentile(gaps, 99) * 1e3, 1),
            "itl_p99_over_p50": round(percentile(gaps, 99) / percentile(gaps, 50), 2)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    cfg = preset(args.preset)
    model = cast(init_weights(BambaLM(cfg), seed=0), torch.bfloat16).eval()
    levels = []
    for concurrency in args.concurrency:
        count = args.requests or 5 * concurrency
        rng = random.Random(concurrency)
        requests = [([rng.randrange(3, cfg.vocab_size) for _ in range(args.prompt_tokens)],
                     rng.randint(args.max_tokens // 2, args.max_tokens * 3 // 2))
                    for _ in range(count)]
        rounds: dict[str, list[dict[str, Any]]] = {s: [] for s in args.settings}
        for _ in range(args.rounds):
            for setting in args.settings:
                llm = LLM(model, memory_gb=1.0, max_num_seqs=concurrency,
                          enable_prefix_caching=False,
                          mixed_step_tokens=int(setting) or None)
                llm.generate([requests[0][0]], SamplingParams(max_tokens=2, ignore_eos=True))
                result = closed_loop(llm, requests, concurrency)
                rounds[setting].append(result)
                print({"concurrency": concurrency, "mixed_step_tokens": setting, **result},
                      flush=True)
        for setting, results in rounds.items():
            best = max(results, key=lambda r: r["output_tok_per_s"])
            levels.append({"concurrency": concurrency, "mixed_step_tokens": int(setting) or None,
                           "requests": count, **best,
                           "rounds_tok_per_s": [r["output_tok_per_s"] for r in results],
                           "rounds_itl_p99_over_p50": [r["itl_p99_over_p50"] for r in results]})
    return {"benchmark": "mixed_steps", "host": describe_host(quick=args.quick),
            "settings": {"preset": args.preset, "dtype": "bfloat16", "threads": args.threads,
                         "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
                         "rounds": args.rounds, "loop": "closed, in process, greedy"},
            "levels": levels}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = in_passing_thread(lambda: run(args))
    print(f"\nmodel {args.preset}, bfloat16, {args.threads} threads (best round of {args.rounds})")
    print("conc mixed  tok/s  steps TTFT p50   p99  ITL p50    p99  p99/p50")
    for lv in report["levels"]:
        print(f"{lv['concurrency']:4} {str(lv['mixed_step_tokens']):>5}"
              f" {lv['output_tok_per_s']:6.1f}"
              f" {lv['steps']:6} {lv['ttft_p50_s']:8.3f} {lv['ttft_p99_s']:5.3f}"
              f" {lv['itl_p50_ms']:8.1f} {lv['itl_p99_ms']:6.1f} {lv['itl_p99_over_p50']:8.2f}")
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
