"""bamba against llama.cpp on the same weights: prefill 512 / 4K tokens, decode at batch 1 / 8 / 32.

The bench hybrid (``preset("bench")``) and its all-attention twin (``bamba.config.llama_twin``)
are written once as random-weight bf16 checkpoints; llama.cpp gets its own converter's BF16 GGUF
of each (the hybrid as ``granitehybrid``, the twin as ``llama``). Where ``bamba quantize``
exists (package ``bamba.quant``), int8 and int4 checkpoints are made from the bf16 one and
llama.cpp's ``llama-quantize`` makes Q8_0 and Q4_0 from its BF16 GGUF; without it those rows
are skipped and the JSON says why.

Per model and format, one rotation measures each side once (bamba, then llama.cpp), for
--rounds rotations; each figure keeps its best round:

* bamba, in a fresh child process (its resident memory is its own; weights loaded by
  ``from_pretrained`` with the native kernels): prefill = one forward of a random prompt of
  each --prompts length through a fresh contiguous cache, logits of the last position only
  (median of --repeats); decode at each --batches size = the model's decode step through a
  contiguous cache whose rows first prefilled --decode-context tokens, median of --steps steps
  after 2 warm-up steps (``measure.decode_seconds``, as bench_native.py times a step);
* llama.cpp: ``llama-bench -p <prompts> -n 0`` (prefill, mean of --repeats), ``llama-bench
  -p 0 -n <steps> -d <decode-context>`` (batch-1 decode at the same context) and
  ``llama-batched-bench -npp <decode-context> -ntg <steps> -npl <batches above 1>`` (decode
  tok/s over all sequences; run again if it loses its result rows, see ``measure``), its
  default batch sizes and flash-attention setting.

Every row: bamba tok/s, llama.cpp tok/s and their ratio (bamba / llama.cpp). With
--on-their-files bamba's int8 / int4 rows run llama.cpp's own Q8_0 / Q4_0 file (the same bytes
on both sides: its Q8_0 / Q4_0 blocks load as our int8 / int4 group-32 formats, a Granite MoE's
experts included) instead of a ``bamba quantize`` checkpoint.

    python benchmarks/bench_llamacpp.py                      # bench shape, hybrid and twin
    python benchmarks/bench_llamacpp.py --models hybrid --formats bf16
    python benchmarks/bench_llamacpp.py --quick              # tiny shape: a smoke test

Writes benchmarks/results/llamacpp.json (--output).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import llama_cpp  # noqa: E402
from measure import (add_common_options, bamba_cli, best, decode_seconds,  # noqa: E402
                     llama_ggufs, parse_quick, prefill_seconds, rss_mb, run_batched_bench,
                     run_benchmark, run_child, run_llama_bench, write_random)

RESULTS = Path(__file__).parent / "results" / "llamacpp.json"
MODELS = ("hybrid", "twin")
PEERS = {"bf16": "BF16", "int8": "Q8_0", "int4": "Q4_0"}  # our format -> llama.cpp's
QUICK = {"preset": "tiny", "prompts": [64, 256], "batches": [1, 4], "decode_context": 16,
         "steps": 4, "repeats": 1, "rounds": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="bench", help="model shape (bamba.config.preset)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS,
                   help="the hybrid and/or its all-attention twin")
    p.add_argument("--formats", nargs="+", default=list(PEERS), choices=list(PEERS),
                   help="weight formats (int8/int4 need bamba quantize)")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size")
    p.add_argument("--on-their-files", action="store_true",
                   help="bamba runs llama.cpp's own Q8_0 / Q4_0 file for int8 / int4 (the same "
                        "bytes on both sides) instead of its own quantized checkpoint")
    p.add_argument("--prompts", type=int, nargs="+", default=[512, 4096],
                   help="prefill lengths in tokens")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="decode batches")
    p.add_argument("--decode-context", type=int, default=128,
                   help="tokens in every row's cache before the timed decode steps")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps")
    p.add_argument("--repeats", type=int, default=3, help="prefill repeats within a round")
    p.add_argument("--rounds", type=int, default=2, help="rotations over the sides")
    add_common_options(p, RESULTS, "tiny shape, short prompts, batches 1 and 4, one round")
    args = parse_quick(p, argv, QUICK)
    numbers = [*args.prompts, *args.batches, args.steps, args.repeats, args.rounds,
               args.threads, args.group_size]
    if min(numbers) < 1 or args.decode_context < 0:
        p.error("--prompts, --batches, --steps, --repeats, --rounds, --threads and "
                "--group-size must be >= 1, --decode-context >= 0")
    return args


# ---- bamba, one checkpoint in its own process ---------------------------------------------------
def measure(directory: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from bamba.checkpoint import from_pretrained
    from bamba.native import accelerate

    torch.set_num_threads(args.threads)
    baseline = rss_mb()
    model = accelerate(from_pretrained(directory, dtype=torch.bfloat16).eval())
    out: dict[str, Any] = {"rss_model_mb": round(rss_mb() - baseline, 1)}
    for n in args.prompts:
        seconds = statistics.median(prefill_seconds(model, n, seed) for seed in range(args.repeats))
        out[f"prefill_{n}_tok_s"] = round(n / seconds, 1)
    for b in args.batches:
        out[f"decode_b{b}_tok_s"] = round(b / decode_seconds(model, b, args.steps,
                                                             args.decode_context), 1)
    return out


def bamba_side(directory: Path, args: argparse.Namespace) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--measure", str(directory), "--threads", str(args.threads),
            "--steps", str(args.steps), "--repeats", str(args.repeats), "--decode-context",
            str(args.decode_context), "--prompts", *map(str, args.prompts), "--batches",
            *map(str, args.batches)]
    return run_child(argv)


# ---- llama.cpp ---------------------------------------------------------------------------------
def llama_side(gguf: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The same figures from llama-bench (prefill, batch-1 decode) and llama-batched-bench
    (larger batches) on one GGUF."""
    build, threads = args.llama_cpp == "auto", args.threads
    out: dict[str, Any] = {"size_mb": round(gguf.stat().st_size / 1e6, 1)}
    prefill, _ = run_llama_bench(gguf, threads, ["-p", ",".join(map(str, args.prompts)), "-n",
                                                 "0", "-r", str(args.repeats)], build=build)
    for n in args.prompts:
        out[f"prefill_{n}_tok_s"] = round(prefill[(n, 0, 0)]["tok_s"], 1)
    if 1 in args.batches:
        decode, _ = run_llama_bench(gguf, threads, ["-p", "0", "-n", str(args.steps), "-d",
                                                    str(args.decode_context), "-r", "1"],
                                    build=build)
        out["decode_b1_tok_s"] = round(decode[(0, args.steps, args.decode_context)]["tok_s"], 1)
    larger = [b for b in args.batches if b > 1]
    if larger:
        expect = [(args.decode_context, args.steps, b) for b in larger]
        context = max(larger) * (args.decode_context + args.steps) + 16
        rows = run_batched_bench(gguf, threads, [
            "-c", str(context), "-npp", str(args.decode_context), "-ntg", str(args.steps),
            "-npl", ",".join(map(str, larger))], expect, build=build)
        for key in expect:
            out[f"decode_b{key[2]}_tok_s"] = round(rows[key]["decode_tok_s"], 1)
    return out


# ---- checkpoints -------------------------------------------------------------------------------
def quant_missing() -> str | None:
    """Why ``bamba quantize`` cannot make int8/int4 checkpoints here, or None."""
    if importlib.util.find_spec("bamba.quant") is None:
        return "bamba.quant is not installed here (no `bamba quantize`)"
    return None


def checkpoints(work: Path, args: argparse.Namespace) -> tuple[dict, dict, dict[str, str]]:
    """bamba's checkpoints {(model, format): dir}, what was written per model, and why a
    format has none."""
    from bamba.config import llama_twin, preset

    hybrid = preset(args.preset, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    configs = {"hybrid": hybrid, "twin": llama_twin(hybrid)}
    dirs, info, skipped = {}, {}, {}
    missing = quant_missing()
    for model in args.models:
        source = work / f"{args.preset}-{model}"
        info[model] = {"preset": args.preset, **write_random(source, configs[model])}
        for fmt in args.formats:
            if fmt == "bf16" or args.on_their_files:
                dirs[model, fmt] = source  # their files: replaced by the GGUF in ``run``
            elif missing:
                skipped[fmt] = missing
            else:
                out = work / f"{source.name}-{fmt}"
                extra = ["--group-size", str(args.group_size)] if fmt == "int4" else []
                try:
                    if not (out / "config.json").is_file():
                        bamba_cli("quantize", str(source), str(out), "--scheme", fmt, *extra)
                    dirs[model, fmt] = out
                except RuntimeError as exc:
                    skipped[fmt] = str(exc)
    return dirs, info, skipped


def peer_files(dirs: dict, args: argparse.Namespace, work: Path) -> tuple[dict, str | None]:
    """llama.cpp's GGUF for each of bamba's checkpoints {(model, format): path}, or why none."""
    if args.llama_cpp == "off":
        return {}, "--llama-cpp off"
    kinds = tuple(sorted({PEERS[fmt] for (_, fmt) in dirs if fmt != "bf16"}))
    files = {}
    try:
        for model in args.models:
            made = llama_ggufs(work / f"{args.preset}-{model}", work, kinds)
            files.update({(model, fmt): made[PEERS[fmt]] for (m, fmt) in dirs if m == model})
    except llama_cpp.PeerMissing as exc:
        return {}, str(exc)
    return files, None


# ---- the run -----------------------------------------------------------------------------------
def compare(ours: dict[str, Any], peer: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per figure both sides have: bamba tok/s, llama.cpp tok/s, bamba / llama.cpp."""
    return [{"figure": key.removesuffix("_tok_s"), "bamba_tok_s": ours[key],
             "llama_cpp_tok_s": peer[key], "ratio": round(ours[key] / peer[key], 3)}
            for key in ours if key.endswith("_tok_s") and key in peer]


def run(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    dirs, info, skipped = checkpoints(work, args)
    ggufs, missing = peer_files(dirs, args, work)
    if args.on_their_files:
        dirs = {key: ggufs.get(key, path) if key[1] != "bf16" else path
                for key, path in dirs.items()}
        dirs = {key: path for key, path in dirs.items()
                if key[1] == "bf16" or path.suffix == ".gguf"}
    runs: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    failed: dict[tuple[str, str], str] = {}
    for round_ in range(args.rounds):
        for (model, fmt), directory in dirs.items():
            runs.setdefault((model, fmt, "bamba"), []).append(bamba_side(directory, args))
            print(json.dumps({"round": round_, "model": model, "format": fmt,
                              "bamba": runs[model, fmt, "bamba"][-1]}), flush=True)
            if (model, fmt) not in ggufs or (model, fmt) in failed:
                continue
            try:
                runs.setdefault((model, fmt, "llama_cpp"), []).append(
                    llama_side(ggufs[model, fmt], args))
            except llama_cpp.PeerMissing as exc:
                failed[model, fmt] = str(exc)
                continue
            print(json.dumps({"round": round_, "model": model, "format": fmt,
                              "llama_cpp": runs[model, fmt, "llama_cpp"][-1]}), flush=True)
    results = []
    for model, fmt in dirs:
        ours = best(runs[model, fmt, "bamba"])
        peer_runs = runs.get((model, fmt, "llama_cpp"))
        peer = best(peer_runs) if peer_runs else \
            {"missing": failed.get((model, fmt)) or missing or "no GGUF"}
        results.append({"model": model, "format": fmt, "llama_cpp_type": PEERS[fmt],
                        "bamba": ours, "llama_cpp": peer, "rows": compare(ours, peer)})
    return {"models": info, "results": results, "skipped_formats": skipped}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args)))
        return 0
    return run_benchmark(args, "bamba vs llama.cpp on the same weights: prefill and decode per "
                               "batch", run, print_table, llama_cpp_version=llama_cpp.VERSION)


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{'model':>6} {'format':>6} {'figure':>14} {'bamba':>9} {'llama.cpp':>9} "
          f"{'ratio':>6}")
    for result in report["results"]:
        rows = result["rows"] or [{"figure": f, "bamba_tok_s": v, "llama_cpp_tok_s": None,
                                   "ratio": None}
                                  for f, v in result["bamba"].items() if f.endswith("_tok_s")]
        for row in rows:
            peer, ratio = row["llama_cpp_tok_s"], row["ratio"]
            print(f"{result['model']:>6} {result['format']:>6} {row['figure']:>14} "
                  f"{row['bamba_tok_s']:>9.1f} {'-' if peer is None else f'{peer:.1f}':>9} "
                  f"{'-' if ratio is None else f'{ratio:.2f}':>6}")
        if "missing" in result["llama_cpp"]:
            print(f"    llama.cpp: {result['llama_cpp']['missing']}")
    for fmt, why in report["skipped_formats"].items():
        print(f"{fmt} skipped: {why}")


if __name__ == "__main__":
    raise SystemExit(main())
