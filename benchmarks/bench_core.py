"""Model-core benchmark: bamba vs transformers, hybrid and all-attention, in one run.

For each dtype: prefill tok/s (one prompt of --prompt tokens) and greedy decode tok/s
(--decode tokens after it), median of --repeats, for
  bamba hybrid, bamba all-attention twin (eager, and with a compiled decode step),
  transformers BambaForCausalLM and LlamaForCausalLM (generate with use_cache).
All four load the same random-weight checkpoints, written once by transformers into a temp dir.
Writes benchmarks/results/core.json and prints a table.

    python benchmarks/bench_core.py                   # full run (bench shape, bf16 + fp32)
    python benchmarks/bench_core.py --quick           # tiny shape, seconds: a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from bamba.cache import ContiguousCache
from bamba.checkpoint import from_pretrained
from bamba.compile import MODES, CompiledForward
from bamba.config import BambaConfig, llama_twin, preset
from bamba.dtypes import dtype_name, parse_dtype
from bamba.native import accelerate
from bench_engine import StepClock  # noqa: E402 (a sibling script)

sys.path.insert(0, str(Path(__file__).parent))
from host import describe_host, write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "core.json"
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="bench", help="config preset for the hybrid model")
    p.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated dtypes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=512, help="prompt length (tokens)")
    p.add_argument("--decode", type=int, default=64, help="greedy tokens decoded after it")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", default="default", choices=("none", *MODES),
                   help="torch.compile mode for bamba's decode step ('none' to skip)")
    p.add_argument("--compile-prefill-dtypes", default="",
                   help="dtypes for which the prefill is compiled too (static prompt length; "
                        "its compile takes minutes)")
    p.add_argument("--compile-dtypes", default="bfloat16",
                   help="dtypes for which the compiled decode step is measured")
    p.add_argument("--quick", action="store_true",
                   help="tiny preset, short prompt, one repeat, no compile: a smoke test")
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.prompt, args.decode, args.repeats = "tiny", 32, 8, 1
        args.compile = "none"
    try:
        args.dtypes = _dtype_names(args.dtypes, "--dtypes")
        args.compile_dtypes = _dtype_names(args.compile_dtypes, "--compile-dtypes")
        args.compile_prefill_dtypes = _dtype_names(args.compile_prefill_dtypes,
                                                   "--compile-prefill-dtypes")
    except ValueError as exc:
        p.error(str(exc))
    return args


def _dtype_names(text: str, option: str) -> list[str]:
    """Canonical names of a comma-separated dtype list (the package's one dtype parser)."""
    return [dtype_name(d, option) for d in text.split(",") if d]


def machine_info(threads: int) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), platform.processor()) \
        if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "threads": threads,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform()}


def write_checkpoint(config: BambaConfig, directory: Path) -> None:
    """Random weights from transformers' own model class, saved in its layout (float32)."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict()))
    hf_config = transformers.AutoConfig.from_pretrained(directory)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(hf_config).save_pretrained(directory)


def _median_rate(tokens: int, seconds: list[float]) -> float:
    return tokens / statistics.median(seconds)


def bench_bamba(directory: Path, dtype: torch.dtype, args: argparse.Namespace,
                ids: torch.Tensor, compile_mode: str) -> dict:
    """Prefill, then greedy decode: eager, or through compiled steps (decode always, prefill
    with --compile-prefill), compiled during an untimed warm-up run. The model runs with the
    native kernels installed (``accelerate``), as ``generate``, ``LLM`` and the CLI run it."""
    model = accelerate(from_pretrained(directory, dtype=dtype).eval())
    length = args.prompt + args.decode
    compiled = CompiledForward(model, compile_mode) if compile_mode != "none" else None
    compile_prefill = compiled is not None and str(dtype).removeprefix("torch.") \
        in args.compile_prefill_dtypes

    def forward(tokens: torch.Tensor, positions: torch.Tensor, cache: ContiguousCache,
                use_compiled: bool) -> torch.Tensor:
        if use_compiled and compiled is not None:
            return compiled(tokens, positions, cache)
        return model(tokens, positions=positions, cache=cache, logits_to_keep=1)[:, -1]

    def run(steps: int) -> tuple[float, float, list[int]]:
        cache = ContiguousCache(model.config, 1, length, dtype)
        start = time.perf_counter()
        positions = torch.arange(args.prompt).expand(1, -1)
        tok = forward(ids, positions, cache, compile_prefill).argmax(-1, keepdim=True)
        mid = time.perf_counter()
        path = [int(tok)]
        for i in range(steps):
            pos = torch.full((1, 1), args.prompt + i, dtype=torch.long)
            tok = forward(tok, pos, cache, True).argmax(-1, keepdim=True)
            path.append(int(tok))
        return mid - start, time.perf_counter() - mid, path

    with torch.inference_mode():
        run(2)  # warm-up, and the compiles
        runs = [run(args.decode) for _ in range(args.repeats)]
    return {"prefill_tok_s": _median_rate(args.prompt, [r[0] for r in runs]),
            "decode_tok_s": _median_rate(args.decode, [r[1] for r in runs]),
            "compile_mode": compile_mode,
            "compiled_prefill": compile_prefill,
            "compile_seconds": compiled.compile_seconds if compiled else 0.0,
            "compiles": [{"tokens": length, "seconds": seconds}
                         for _, length, seconds in (compiled.compiles if compiled else [])],
            "load_average": os.getloadavg(), "tokens": runs[0][2]}


def bench_transformers(directory: Path, dtype: torch.dtype, args: argparse.Namespace,
                       ids: torch.Tensor) -> dict:
    """Prefill = forward of the prompt with use_cache; decode = generate's later steps."""
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()

    def run(steps: int) -> tuple[float, float, list[int]]:
        clock = StepClock()
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=steps + 1, min_new_tokens=steps + 1,
                             do_sample=False, use_cache=True, pad_token_id=0,
                             logits_processor=transformers.LogitsProcessorList([clock]))
        end = time.perf_counter()
        # clock.times[0]: prefill done; each later entry one decode step done (the last
        # step's sampling and bookkeeping runs until generate returns).
        return clock.times[0] - start, end - clock.times[0], out[0, ids.shape[1]:].tolist()

    with torch.inference_mode():
        run(2)  # warm-up
        runs = [run(args.decode) for _ in range(args.repeats)]
    return {"prefill_tok_s": _median_rate(args.prompt, [r[0] for r in runs]),
            "decode_tok_s": _median_rate(args.decode, [r[1] for r in runs]),
            "load_average": os.getloadavg(), "tokens": runs[0][2]}


def _same_path(a: list[int], b: list[int]) -> int:
    """Number of leading greedy tokens two implementations agree on."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def bench_dtype(dirs: dict[str, Path], name: str, args: argparse.Namespace,
                ids: torch.Tensor) -> dict:
    dtype = parse_dtype(name)
    rows = {}
    for arch in ("hybrid", "twin"):
        rows[f"bamba_{arch}"] = bench_bamba(dirs[arch], dtype, args, ids, "none")
        if args.compile != "none" and name in args.compile_dtypes:
            rows[f"bamba_{arch}_compiled"] = bench_bamba(dirs[arch], dtype, args, ids, args.compile)
        rows[f"transformers_{arch}"] = bench_transformers(dirs[arch], dtype, args, ids)
        for key in [k for k in rows if arch in k]:
            print(f"{name} {key}: prefill {rows[key]['prefill_tok_s']:.1f} tok/s, decode "
                  f"{rows[key]['decode_tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    for key, row in rows.items():
        ref = rows["transformers_" + ("twin" if "twin" in key else "hybrid")]
        row["prefill_vs_transformers"] = row["prefill_tok_s"] / ref["prefill_tok_s"]
        row["decode_vs_transformers"] = row["decode_tok_s"] / ref["decode_tok_s"]
        row["greedy_tokens_same_as_transformers"] = _same_path(row["tokens"], ref["tokens"])
    for row in rows.values():
        del row["tokens"]
    return rows


def print_table(results: dict) -> None:
    print(f"{'dtype':9} {'implementation':28} {'prefill tok/s':>13} {'x tf':>6} "
          f"{'decode tok/s':>12} {'x tf':>6} {'compile s':>9}")
    for name, rows in results["results"].items():
        for impl, r in rows.items():
            print(f"{name:9} {impl:28} {r['prefill_tok_s']:13.1f}"
                  f" {r['prefill_vs_transformers']:6.2f}"
                  f" {r['decode_tok_s']:12.1f} {r['decode_vs_transformers']:6.2f}"
                  f" {r.get('compile_seconds', 0.0):9.1f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = preset(args.preset)
    configs = {"hybrid": config, "twin": llama_twin(config)}
    ids = torch.randint(3, config.vocab_size, (1, args.prompt),
                        generator=torch.Generator().manual_seed(0))
    load_before, started = os.getloadavg(), time.time()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {arch: Path(tmp) / arch for arch in configs}
        for arch, cfg in configs.items():
            write_checkpoint(cfg, dirs[arch])
        results = {name: bench_dtype(dirs, name, args, ids) for name in args.dtypes}
    report = {
        "machine": machine_info(args.threads), "host": describe_host(),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "wall_seconds": time.time() - started,
        "shapes": {"preset": args.preset, "batch": 1, "prompt_tokens": args.prompt,
                   "decode_tokens": args.decode, "hybrid": config.to_hf_dict(),
                   "parameters": sum(t.numel() for t in from_pretrained_shapes(config))},
        "repeats": args.repeats, "statistic": "median",
        "compile": {"mode": args.compile, "decode_dtypes": args.compile_dtypes,
                    "prefill_dtypes": args.compile_prefill_dtypes,
                    "inductor": "freezing=True, static shapes (batch, tokens, cache length)"},
        "command": "python benchmarks/bench_core.py " + " ".join(sys.argv[1:] if argv is None
                                                                  else argv),
        "results": results,
    }
    print_table(report)
    write_json(args.output, report)
    print(f"wrote {args.output} (load average {report['load_average_before']} -> "
          f"{report['load_average_after']})")
    return 0


def from_pretrained_shapes(config: BambaConfig) -> list[torch.Tensor]:
    """Parameters of the hybrid built on the meta device (for the parameter count only)."""
    from bamba.model import BambaLM

    with torch.device("meta"):
        return list(BambaLM(config).parameters())


if __name__ == "__main__":
    raise SystemExit(main())
