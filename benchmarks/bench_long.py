"""Long context: one request with a 32K- and a 128K-token prompt, hybrid vs twin vs llama.cpp.

The bench hybrid (``preset("bench")``: the Bamba-9B layout at hidden 512, attention at layers
9/18/27 of 32) and its all-attention twin (``bamba.config.llama_twin``) are written as
random-weight bf16 checkpoints whose ``max_position_embeddings`` is raised to cover the longest
prompt plus the decoded tokens (the preset says 65536; only the attention layers read positions,
through RoPE, and the Mamba layers need nothing for a longer context). For every prompt length
in --lengths, shortest first, each model is measured in a fresh child process (so its resident
memory is its own) through the engine (``bamba.engine.LLM``, one sequence, prefix caching off):

* prefill: one request of random token ids, from ``add_request`` to the step that samples its
  first token. The engine's scheduler cuts the prompt into chunks of --chunk tokens
  (``max_num_batched_tokens``); each chunk's attention runs torch's CPU flash kernel against
  the keys gathered so far, so no [L, L] score matrix exists. What a chunk does build is a
  boolean causal mask per block of ``bamba.model.QUERY_BLOCK`` queries [block, T] (T = keys so
  far), which the flash call turns into an additive mask of the model dtype: about block x T x 3
  bytes at the last chunk (~100 MB at 128K), recorded as ``transient_mask_mb`` beside the peak.
  The runner also gathers one layer's keys and values (all positions so far) into buffers it
  keeps between prefill steps and frees once decoding starts (``gather_buffers_mb``, up to
  1.25x the need: ~84 MB at 128K);
* decode: the same request's next --decode-tokens tokens, one engine step each (tok/s from
  the median step; the mean is recorded too), at context L .. L + decode;
* memory: VmRSS after loading, and after decoding, and the peak (VmHWM), each above the child's
  baseline before loading (torch and bamba imported), beside ``bamba analyze``'s prediction
  (``bamba.analyze``: parameters x 2 bytes, KV per token x tokens, the Mamba state of one
  sequence). The engine's pools are sized to exactly this request (whole KV blocks).

The twin at long lengths: its memory is predicted for every length; it runs only if the
prediction fits in the host's available memory and, from its second length on, its time
(the previous length's, scaled by ``bamba.analyze``'s prefill FLOPs) is within
--twin-max-seconds; a run past that budget is killed. Either way the JSON says why not.

llama.cpp (--llama-cpp auto; benchmarks/llama_cpp.py finds or builds it): llama.cpp's own
conversion of the same checkpoints to BF16 GGUF (the hybrid as ``granitehybrid``, the twin as
``llama``), measured by ``llama-bench`` with its default batch sizes (-b 2048 -ub 512) and
flash-attention setting: ``-p L -n 0 --no-warmup`` (the prefill of one sequence) and ``-p 0
-n <decode> -d L`` (the decode after an untimed prefill of L tokens), and its peak resident
memory (the mapped GGUF included). So llama.cpp prefills each prompt twice, once timed.
(``llama-batched-bench`` would do both in one pass, but it prints its results from a logger
thread that is never joined at exit, and on a busy host lost them.) The twin's budget applies
to it too.

Each case runs --rounds times in rotation (bamba hybrid, llama.cpp hybrid, bamba twin,
llama.cpp twin, per length); the best round is kept.

    python benchmarks/bench_long.py                          # 32K and 128K, bench shape
    python benchmarks/bench_long.py --lengths 32768 --llama-cpp off
    python benchmarks/bench_long.py --quick                  # tiny shape, 1K and 2K: a smoke test

Writes benchmarks/results/long.json (--output).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import llama_cpp  # noqa: E402
from measure import (ChildTimeout, add_common_options, best, llama_ggufs,  # noqa: E402
                     parse_quick, rss_mb, run_benchmark, run_child, run_llama_bench,
                     write_random)

RESULTS = Path(__file__).parent / "results" / "long.json"
MODELS = ("hybrid", "twin")
BLOCK_SIZE = 16  # the engine's default KV block
QUICK = {"preset": "tiny", "lengths": [1024, 2048], "decode_tokens": 8, "chunk": 512}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="bench", help="model shape (bamba.config.preset)")
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072],
                   help="prompt lengths in tokens, one request each")
    p.add_argument("--decode-tokens", type=int, default=32,
                   help="tokens decoded after each prompt")
    p.add_argument("--chunk", type=int, default=2048,
                   help="prefill chunk: the engine's max_num_batched_tokens")
    p.add_argument("--state-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="the engine's Mamba state")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS,
                   help="the hybrid and/or its all-attention twin")
    p.add_argument("--twin-max-seconds", type=float, default=3600.0,
                   help="time budget of one twin case (each side)")
    p.add_argument("--rounds", type=int, default=1, help="rotations over the cases")
    add_common_options(p, RESULTS, "tiny shape, 1K and 2K tokens, 8 decoded, 512-token chunks")
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)  # of the measuring child
    args = parse_quick(p, argv, QUICK)
    if min(args.lengths) < 1 or args.decode_tokens < 1 or args.chunk < 1 or args.rounds < 1:
        p.error("--lengths, --decode-tokens, --chunk and --rounds must be >= 1")
    if args.twin_max_seconds <= 0:
        p.error("--twin-max-seconds must be positive")
    args.lengths = sorted(set(args.lengths))
    return args


# ---- predictions --------------------------------------------------------------------------------
def predicted_memory(config: Any, tokens: int, state_dtype: str, chunk: int) -> dict[str, float]:
    """``bamba analyze``'s bytes for one sequence of ``tokens`` tokens: weights, KV, state (MB).
    Beside them, what the engine's prefill adds: the last query block's mask (transient) and the
    runner's buffers for one layer's gathered keys and values (kept; at most 1.25x the need)."""
    from bamba.analyze import (Precision, kv_bytes_per_token, parameter_count,
                               state_bytes_per_sequence)
    from bamba.model import QUERY_BLOCK

    precision = Precision(weights="bfloat16", kv="bfloat16", state=state_dtype)
    weights = parameter_count(config) * precision.weight_bytes
    kv = kv_bytes_per_token(config, precision) * tokens
    state = state_bytes_per_sequence(config, precision)
    attention = bool(config.attn_layer_indices)
    mask = min(QUERY_BLOCK, chunk, tokens) * tokens * (1 + precision.kv_bytes) if attention else 0
    gather = 2.5 * tokens * config.num_key_value_heads * config.head_dim * precision.kv_bytes \
        if attention else 0
    return {"weights_mb": round(weights / 1e6, 1), "kv_mb": round(kv / 1e6, 1),
            "state_mb": round(state / 1e6, 1), "total_mb": round((weights + kv + state) / 1e6, 1),
            "transient_mask_mb": round(mask / 1e6, 1),
            "gather_buffers_mb": round(gather / 1e6, 1)}


def scaled_seconds(config: Any, seconds: float, measured_len: int, length: int) -> float:
    """A prefill time at ``measured_len`` tokens scaled to ``length`` by the analyzed FLOPs."""
    from bamba.analyze import Precision, prefill_cost

    flops = [prefill_cost(config, 1, n, Precision()).flops for n in (measured_len, length)]
    return seconds * flops[1] / flops[0]


def available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def pool_gb(config: Any, tokens: int, state_dtype: str) -> float:
    """The engine's memory budget (GB) for exactly one sequence of ``tokens`` tokens: its whole
    KV blocks (one spare, against rounding) and one state slot."""
    import torch

    from bamba.engine.page_pool import kv_bytes_per_block, state_bytes_per_slot

    blocks = math.ceil(tokens / BLOCK_SIZE) + 1
    total = blocks * kv_bytes_per_block(config, BLOCK_SIZE, torch.bfloat16) + \
        state_bytes_per_slot(config, torch.bfloat16, getattr(torch, state_dtype))
    return total / 1e9


# ---- one case, in its own process ---------------------------------------------------------------
def measure(directory: Path, length: int, args: argparse.Namespace) -> dict[str, Any]:
    """Prefill, decode and memory of one request of ``length`` prompt tokens (a child process)."""
    import torch

    from bamba.checkpoint import load_config
    from bamba.engine import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    baseline = rss_mb()
    config = load_config(directory)
    tokens = length + args.decode_tokens + 1  # the last sampled token is never fed back
    llm = LLM(str(directory), dtype="bfloat16", memory_gb=pool_gb(config, tokens, args.state_dtype),
              block_size=BLOCK_SIZE, max_num_seqs=1, max_num_batched_tokens=args.chunk,
              enable_prefix_caching=False, state_dtype=args.state_dtype, max_model_len=tokens)
    loaded = rss_mb()
    gen = torch.Generator().manual_seed(length)
    greedy = dict(temperature=0, ignore_eos=True)
    warm = torch.randint(3, config.vocab_size, (min(length, 2 * args.chunk),), generator=gen)
    llm.generate(warm.tolist(), SamplingParams(max_tokens=2, **greedy))
    prompt = torch.randint(3, config.vocab_size, (length,), generator=gen).tolist()
    llm.add_request(prompt, SamplingParams(max_tokens=args.decode_tokens + 1, **greedy))
    prefill, step_times, produced, prefill_peak = 0.0, [], 0, float("nan")
    while llm.has_unfinished_requests():
        start = time.perf_counter()
        outputs = llm.step()
        elapsed = time.perf_counter() - start
        if produced == 0:  # prefill chunks, up to the step that samples the first token
            prefill += elapsed
        else:
            step_times.append(elapsed)
        for output in outputs:
            produced = len(output.outputs[0].token_ids)
        if produced and not step_times:
            prefill_peak = rss_mb("VmHWM")
    if produced != args.decode_tokens + 1:
        raise RuntimeError(f"the request produced {produced} tokens, not "
                           f"{args.decode_tokens + 1}")
    step = statistics.median(step_times)
    return {"prefill_seconds": round(prefill, 3), "prefill_tok_s": round(length / prefill, 1),
            "prefill_chunks": math.ceil(length / args.chunk),
            "decode_tok_s": round(1 / step, 2),
            "decode_mean_tok_s": round(len(step_times) / sum(step_times), 2),
            "rss_baseline_mb": round(baseline, 1),
            "rss_loaded_mb": round(loaded - baseline, 1),
            "rss_after_decode_mb": round(rss_mb() - baseline, 1),
            "peak_prefill_mb": round(prefill_peak - baseline, 1),
            "peak_mb": round(rss_mb("VmHWM") - baseline, 1)}


def measure_in_child(directory: Path, length: int, args: argparse.Namespace,
                     timeout: float | None) -> dict[str, Any]:
    return run_child([sys.executable, __file__, "--measure", str(directory), "--length",
                      str(length), "--decode-tokens", str(args.decode_tokens), "--chunk",
                      str(args.chunk), "--state-dtype", args.state_dtype, "--threads",
                      str(args.threads)], timeout)


# ---- llama.cpp ----------------------------------------------------------------------------------
def llama_case(gguf: Path, length: int, args: argparse.Namespace,
               timeout: float | None) -> dict[str, Any]:
    """llama-bench twice: prefill of ``length`` tokens (no warm-up run: that would be a second
    prefill), then the decoded tokens at depth ``length`` (its untimed prefill first)."""
    build, start = args.llama_cpp == "auto", time.perf_counter()
    pp, pp_peak = run_llama_bench(gguf, args.threads, ["-p", str(length), "-n", "0", "-r", "1",
                                                       "--no-warmup"], timeout, build)
    left = None if timeout is None else max(1.0, timeout - (time.perf_counter() - start))
    tg, tg_peak = run_llama_bench(gguf, args.threads, ["-p", "0", "-n", str(args.decode_tokens),
                                                       "-d", str(length), "-r", "1"], left, build)
    prefill = pp[(length, 0, 0)]["tok_s"]
    return {"prefill_seconds": round(length / prefill, 3), "prefill_tok_s": round(prefill, 1),
            "decode_tok_s": round(tg[(0, args.decode_tokens, length)]["tok_s"], 2),
            "peak_mb": round(max(pp_peak, tg_peak), 1)}


# ---- the run ------------------------------------------------------------------------------------
def write_models(work: Path, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The hybrid and its twin written as checkpoints in ``work``: their configs, and what was
    written."""
    from bamba.config import llama_twin, preset

    base = preset(args.preset, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    needed = max(args.lengths) + args.decode_tokens + 16
    hybrid = base.replace(max_position_embeddings=max(base.max_position_embeddings, needed))
    configs = {"hybrid": hybrid, "twin": llama_twin(hybrid)}
    info = {}
    for name in args.models:
        info[name] = {"preset": args.preset,
                      **write_random(work / f"{args.preset}-{name}", configs[name])}
    return configs, info


class Case:
    """One (model, length, side): its rounds, or why it does not run."""

    def __init__(self, model: str, length: int, side: str):
        self.model, self.length, self.side = model, length, side
        self.runs: list[dict[str, Any]] = []
        self.skipped: str | None = None

    def report(self) -> dict[str, Any]:
        if self.runs:
            return best(self.runs)
        return {"skipped": self.skipped or "not run"}


def why_not(case: Case, config: Any, done: list[Case], prediction: dict[str, float],
            args: argparse.Namespace) -> tuple[str | None, float | None]:
    """Why a case should not run (or None) and its time budget (None: no limit)."""
    need = prediction["total_mb"] + prediction["transient_mask_mb"]
    if need > 0.9 * available_mb():
        return (f"predicted {need:.0f} MB (weights, KV, state and the prefill's masks) is more "
                f"than 90% of the {available_mb():.0f} MB available"), None
    if case.model != "twin":
        return None, None
    earlier = [c for c in done if c.runs and c.length < case.length]
    if earlier:
        prev, prefills = earlier[-1], 2 if case.side == "llama_cpp" else 1  # llama-bench: 2
        seconds = best(prev.runs)["prefill_seconds"]
        guess = prefills * scaled_seconds(config, seconds, prev.length, case.length)
        if guess > args.twin_max_seconds:
            return (f"prefill predicted {guess:.0f} s ({prefills} x {seconds:.1f} s at "
                    f"{prev.length} tokens scaled by prefill FLOPs) > --twin-max-seconds "
                    f"{args.twin_max_seconds:g}"), None
    return None, args.twin_max_seconds


def run_case(case: Case, paths: dict[str, Path], args: argparse.Namespace,
             timeout: float | None) -> None:
    try:
        if case.side == "bamba":
            result = measure_in_child(paths[case.model], case.length, args, timeout)
        else:
            result = llama_case(paths[case.model], case.length, args, timeout)
    except ChildTimeout as exc:
        case.skipped = f"ran past the time budget: {exc}"
        return
    except llama_cpp.PeerMissing as exc:
        case.skipped = str(exc)
        return
    case.runs.append(result)
    print(json.dumps({"model": case.model, "length": case.length, case.side: result}),
          flush=True)


def llama_paths(dirs: dict[str, Path], work: Path, args: argparse.Namespace
                ) -> tuple[dict[str, Path], str | None]:
    """BF16 GGUFs of the checkpoints by llama.cpp's converter, or why there are none."""
    if args.llama_cpp == "off":
        return {}, "--llama-cpp off"
    try:
        llama_cpp.find_or_build(build=args.llama_cpp == "auto", tool="llama-bench")
        return {m: llama_ggufs(d, work, kinds=())["BF16"] for m, d in dirs.items()}, None
    except llama_cpp.PeerMissing as exc:
        return {}, str(exc)


def run(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    configs, info = write_models(work, args)
    dirs = {m: work / f"{args.preset}-{m}" for m in args.models}
    ggufs, missing = llama_paths(dirs, work, args)
    sides = {"bamba": dirs, "llama_cpp": ggufs}
    cases = [Case(m, n, side) for n in args.lengths for m in args.models for side in sides]
    predictions = {(m, n): predicted_memory(configs[m], n + args.decode_tokens,
                                            args.state_dtype, args.chunk)
                   for m in args.models for n in args.lengths}
    for _ in range(args.rounds):
        for case in cases:
            if case.side == "llama_cpp" and missing:
                case.skipped = missing
            if case.skipped:
                continue
            done = [c for c in cases if c.model == case.model and c.side == case.side]
            case.skipped, budget = why_not(case, configs[case.model], done,
                                           predictions[case.model, case.length], args)
            if not case.skipped:
                run_case(case, sides[case.side], args, budget)
    rows = []
    for n in args.lengths:
        for m in args.models:
            bamba = {**next(c for c in cases if (c.model, c.length, c.side) == (m, n, "bamba")
                            ).report(), "predicted": predictions[m, n]}
            if "rss_after_decode_mb" in bamba:
                bamba["memory_vs_predicted"] = round(
                    bamba["rss_after_decode_mb"] / predictions[m, n]["total_mb"], 3)
            peer = next(c for c in cases if (c.model, c.length, c.side) == (m, n, "llama_cpp"))
            rows.append({"model": m, "length": n, "bamba": bamba, "llama_cpp": peer.report()})
    return {"models": info, "cases": rows, "ratios": ratios(rows)}


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per length: bamba over llama.cpp (prefill and decode tok/s, per model) and the hybrid
    over its twin (bamba's decode and prefill), where both figures exist."""
    def ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
        return round(a[key] / b[key], 3) if key in a and key in b else None

    out = []
    for n in sorted({r["length"] for r in rows}):
        at = {r["model"]: r for r in rows if r["length"] == n}
        row: dict[str, Any] = {"length": n}
        for m, r in at.items():
            for key in ("prefill_tok_s", "decode_tok_s"):
                row[f"{m}_{key}_vs_llama_cpp"] = ratio(r["bamba"], r["llama_cpp"], key)
        if len(at) == 2:
            for key in ("prefill_tok_s", "decode_tok_s"):
                row[f"hybrid_vs_twin_{key}"] = ratio(at["hybrid"]["bamba"], at["twin"]["bamba"],
                                                     key)
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.length, args)))
        return 0
    return run_benchmark(
        args, "long context: one request, prefill then decode, hybrid vs twin vs llama.cpp, "
              "each case in its own process", run, print_table,
        notes=["max_position_embeddings is raised to cover the longest prompt; only the "
               "attention layers (RoPE) read positions, the Mamba layers need nothing",
               "memory figures are MB above the child's baseline (torch and bamba imported); "
               "llama.cpp's peak_mb is its whole process, the mapped GGUF included"])


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{'model':>6} {'length':>7} {'prefill s':>9} {'tok/s':>8} {'decode tok/s':>12} "
          f"{'MB':>7} {'predicted':>9} {'llama prefill s':>15} {'llama decode':>12}")
    for row in report["cases"]:
        ours, peer = row["bamba"], row["llama_cpp"]
        print(f"{row['model']:>6} {row['length']:>7} {_cell(ours.get('prefill_seconds'), 9)} "
              f"{_cell(ours.get('prefill_tok_s'), 8)} {_cell(ours.get('decode_tok_s'), 12)} "
              f"{_cell(ours.get('rss_after_decode_mb'), 7)} "
              f"{ours['predicted']['total_mb']:>9.1f} {_cell(peer.get('prefill_seconds'), 15)} "
              f"{_cell(peer.get('decode_tok_s'), 12)}")
        for side, result in (("bamba", ours), ("llama.cpp", peer)):
            if "skipped" in result:
                print(f"    {side} skipped: {result['skipped']}")


def _cell(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.2f}"


if __name__ == "__main__":
    raise SystemExit(main())
