"""Engine benchmarks: hybrid vs all-attention twin, engine vs transformers, prefix cache on/off.

Sub-benchmarks (select with --only, default all), each comparing two things in one run on the
bench preset (random weights, seeded) and its Llama twin, bf16 weights, --threads threads:
  context   decode step cost at 512 + 1K/4K/8K context for batch 1/8/32, hybrid vs twin, on a
            cache filled with random values; whole-generation throughput by integrating the step
            cost over context; beside bamba.analyze's predicted speed-up
  long      4K-token context, batch 1 and 8, hybrid vs twin (orientation vs llama.cpp)
  batched   LLM.generate output tok/s at batch 1/8/32 (short prompts) vs transformers'
            generate at batch 8 on the same weights
  prefix    time to first token with a cached 2K-token prefix vs uncached
Writes benchmarks/results/engine.json (sections replaced per run) and engine_context.png.

    python benchmarks/bench_engine.py                      # default sizes, ~10 min on 2 cores
    python benchmarks/bench_engine.py --only prefix,long   # a subset
    python benchmarks/bench_engine.py --quick              # tiny preset, seconds: smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bamba import SamplingParams
from bamba.checkpoint import from_pretrained, save_pretrained
from bamba.config import BambaConfig, llama_twin, preset
from bamba.engine import LLM
from bamba.model import BambaLM, init_weights

sys.path.insert(0, str(Path(__file__).parent))
from engine_decode import (FILL_NOTE, EngineSteps, ModelSteps, Timing, budget_gb,  # noqa: E402
                           generation_rows, load_average, predictions, profile_step,
                           time_alternating)

RESULTS = Path(__file__).parent / "results"
SECTIONS = ("context", "long", "batched", "prefix")
LLAMA_CPP = {"note": "issue 3: llama.cpp on this machine, same weights, 4K-token prompts",
             "batch_8_tok_s": {"hybrid": 171, "twin": 25}, "batch_1_tok_s": {"hybrid": 70,
                                                                             "twin": 45}}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sub-benchmarks")
    p.add_argument("--preset", default="bench")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--state-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="Mamba SSM state dtype in the engine")
    p.add_argument("--path", default="engine", choices=("engine", "model"),
                   help="context/long: engine ModelRunner over paged pools, or model + "
                        "ContiguousCache")
    # context
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--outputs", type=_ints, default=[1024, 4096, 8192])
    p.add_argument("--extra-contexts", type=_ints, default=[],
                   help="more context points for the trapezoid (besides prompt and prompt+outputs)")
    p.add_argument("--batches", type=_ints, default=[1, 8, 32])
    p.add_argument("--steps", type=int, default=2, help="decode steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile-batch", type=int, default=32, help="0 to skip the profile")
    p.add_argument("--full", action="store_true",
                   help="context: also really generate prompt + outputs with LLM.generate "
                        "(hours on a 2-core CPU)")
    # long
    p.add_argument("--long-context", type=int, default=4096)
    p.add_argument("--long-batches", type=_ints, default=[1, 8])
    # batched
    p.add_argument("--gen-batches", type=_ints, default=[1, 8, 32])
    p.add_argument("--gen-prompts", type=int, default=32, help="prompts per engine run")
    p.add_argument("--gen-prompts-b1", type=int, default=4, help="prompts for the batch-1 run")
    p.add_argument("--gen-prompt-len", type=int, default=128)
    p.add_argument("--gen-max-tokens", type=int, default=64)
    p.add_argument("--gen-repeats", type=int, default=2)
    p.add_argument("--gen-bf16-state-batches", type=_ints, default=[32],
                   help="engine runs repeated with a bfloat16 Mamba state (the state traffic "
                        "bounds batch-32 decode)")
    p.add_argument("--gen-compile", type=lambda t: t.split(","), default=["none", "default"],
                   help="comma-separated engine compile modes for the batched section")
    p.add_argument("--hf-batch", type=int, default=8)
    p.add_argument("--hf-repeats", type=int, default=1)
    # prefix
    p.add_argument("--prefix-len", type=int, default=2048)
    p.add_argument("--suffix-len", type=int, default=16)
    p.add_argument("--prefix-requests", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny preset and sizes: a smoke test")
    p.add_argument("--output", type=Path, default=RESULTS / "engine.json")
    args = p.parse_args(argv)
    args.only = [s for s in args.only.split(",") if s]
    bad = [s for s in args.only if s not in SECTIONS]
    if bad:
        p.error(f"unknown sub-benchmark(s) {bad}; choose from {SECTIONS}")
    if args.quick:
        args.preset, args.prompt, args.outputs, args.batches = "tiny", 64, [64, 192], [1, 4]
        args.steps, args.repeats, args.profile_batch = 1, 1, 4
        args.long_context, args.long_batches = 256, [1, 4]
        args.gen_batches, args.gen_prompts, args.gen_prompts_b1 = [1, 4], 4, 2
        args.gen_prompt_len, args.gen_max_tokens, args.gen_repeats, args.hf_batch = 16, 8, 1, 4
        args.prefix_len, args.prefix_requests, args.gen_compile = 128, 2, ["none"]
    return args


# ---- models ------------------------------------------------------------------------------
def build_models(cfg: BambaConfig, seed: int, workdir: Path) -> dict[str, Path]:
    """Random (seeded) weights for the hybrid and its twin, saved in the HF layout so bamba and
    transformers load the very same bf16 weights."""
    dirs = {}
    for name, c in (("hybrid", cfg), ("twin", llama_twin(cfg))):
        model = init_weights(BambaLM(c), seed=seed)
        dirs[name] = save_pretrained(model, workdir / name)
        del model
    return dirs


def load(directory: Path) -> BambaLM:
    return from_pretrained(directory, dtype=torch.bfloat16)


def shapes(cfg: BambaConfig) -> dict:
    twin = llama_twin(cfg)
    count = lambda c: sum(p.numel() for p in BambaLM(c).to("meta").parameters())  # noqa: E731
    return {"hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers,
            "attention_layers": cfg.attn_layer_indices, "heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
            "mamba_heads": cfg.mamba_n_heads, "mamba_head_dim": cfg.mamba_d_head,
            "d_state": cfg.mamba_d_state, "vocab": cfg.vocab_size,
            "parameters": {"hybrid": count(cfg), "twin": count(twin)}}


def _steps(model: BambaLM, args: argparse.Namespace, max_batch: int, max_context: int):
    state = getattr(torch, args.state_dtype)
    if args.path == "engine":
        return EngineSteps(model, max_batch, max_context, state, seed=args.seed)
    return ModelSteps(model, max_context, state, seed=args.seed)


# ---- context and long ----------------------------------------------------------------------
def bench_context(args: argparse.Namespace, dirs: dict[str, Path], cfg: BambaConfig) -> dict:
    contexts = sorted({args.prompt, *(args.prompt + n for n in args.outputs),
                       *args.extra_contexts})
    timing = Timing(args.steps, args.repeats)
    measured: dict[tuple[int, int], dict] = {}
    profiles = {}
    steps = {name: _steps(load(dirs[name]), args, max(args.batches), contexts[-1])
             for name in ("hybrid", "twin")}
    for b in args.batches:
        for s in contexts:
            timed = time_alternating(steps, b, s, timing)
            measured[(b, s)] = {name: {**t, "load_average": load_average()}
                                for name, t in timed.items()}
            print(f"context b={b} s={s}: hybrid {timed['hybrid']['step_s']:.4f}, twin "
                  f"{timed['twin']['step_s']:.4f} s/step", flush=True)
    if args.profile_batch:  # shortest context (weights, states) and a long one (KV)
        profiles = {name: [profile_step(step, args.profile_batch, s)
                           for s in sorted({contexts[0], contexts[len(contexts) // 2]})]
                    for name, step in steps.items()}
    del steps
    gc.collect()
    points = []
    for (b, s), m in sorted(measured.items()):
        ratio = m["twin"]["step_s"] / m["hybrid"]["step_s"]
        pred = predictions(cfg, b, s)
        points.append({"batch": b, "context": s, **m, "hybrid_tok_s": b / m["hybrid"]["step_s"],
                       "twin_tok_s": b / m["twin"]["step_s"], "measured_ratio": ratio,
                       "predicted": pred,
                       "fraction_of_predicted": ratio / pred[f"exact_state_{args.state_dtype}"]})
    generations = []
    for b in args.batches:
        steps = {name: {s: measured[(b, s)][name]["step_s"] for s in contexts}
                 for name in ("hybrid", "twin")}
        generations += generation_rows(steps, cfg, b, args.prompt, args.outputs, args.state_dtype)
    out = {"path": args.path, "state_dtype": args.state_dtype, "threads": args.threads,
           "contexts": contexts, "timing": vars(timing), "method": FILL_NOTE,
           "points": points, "generations": generations, "profile": profiles}
    if args.full:
        out["full"] = full_generations(args, dirs)
    return out


def full_generations(args: argparse.Namespace, dirs: dict[str, Path]) -> list[dict]:
    """Real generations (prompt + n outputs, ignore_eos) through LLM.generate."""
    rows = []
    state = getattr(torch, args.state_dtype)
    for name in ("hybrid", "twin"):
        model = load(dirs[name])
        for b in args.batches:
            for n in args.outputs:
                llm = LLM(model, max_num_seqs=b, enable_prefix_caching=False, state_dtype=state,
                          memory_gb=budget_gb(model, b, args.prompt + n, state),
                          max_model_len=args.prompt + n + 16)
                prompts = random_prompts(b, args.prompt, model.config.vocab_size, args.seed)
                start = time.perf_counter()
                llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n,
                                                     ignore_eos=True))
                seconds = time.perf_counter() - start
                rows.append({"model": name, "batch": b, "outputs": n, "seconds": seconds,
                             "tok_s": b * n / seconds, "per_token_latency_ms": 1e3 * seconds / n})
                del llm
    return rows


def bench_long(args: argparse.Namespace, dirs: dict[str, Path], cfg: BambaConfig) -> dict:
    timing = Timing(args.steps, args.repeats)
    rows = {}
    steps = {name: _steps(load(dirs[name]), args, max(args.long_batches), args.long_context)
             for name in ("hybrid", "twin")}
    for b in args.long_batches:
        timed = time_alternating(steps, b, args.long_context, timing)
        rows[b] = {name: {**t, "tok_s": b / t["step_s"], "load_average": load_average()}
                   for name, t in timed.items()}
    del steps
    gc.collect()
    out = []
    for b, r in sorted(rows.items()):
        out.append({"batch": b, "context": args.long_context, **r,
                    "measured_ratio": r["hybrid"]["tok_s"] / r["twin"]["tok_s"],
                    "predicted": predictions(cfg, b, args.long_context)})
    return {"path": args.path, "state_dtype": args.state_dtype, "method": FILL_NOTE,
            "rows": out, "llama_cpp_reference": LLAMA_CPP}


# ---- batched (engine vs transformers) ---------------------------------------------------
def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


class StepClock:
    """A transformers LogitsProcessor that records when generate asks for each token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


class StepLog:
    """Wraps an LLM instance's ``step`` and its scheduler's ``schedule`` (instance attributes,
    nothing patched globally) to time every step and tell decode-only steps apart."""

    def __init__(self, llm: LLM):
        self.records: list[tuple[float, int, bool]] = []  # seconds, chunks, decode-only
        self._last = None
        schedule, step = llm.scheduler.schedule, llm.step

        def logged_schedule():
            self._last = schedule()
            return self._last

        def timed_step():
            start = time.perf_counter()
            result = step()
            chunks = self._last.chunks if self._last is not None else []
            decode = bool(chunks) and all(len(c.token_ids) == 1 for c in chunks)
            self.records.append((time.perf_counter() - start, len(chunks), decode))
            return result

        llm.scheduler.schedule, llm.step = logged_schedule, timed_step

    def decode_tok_s(self) -> float:
        decode = [(s, n) for s, n, d in self.records if d]
        return sum(n for _, n in decode) / sum(s for s, _ in decode) if decode else float("nan")


def engine_generate(model: BambaLM, args: argparse.Namespace, batch: int,
                    state_dtype: str, compile_mode: str) -> dict:
    n = args.gen_prompts_b1 if batch == 1 else args.gen_prompts
    prompts = random_prompts(n, args.gen_prompt_len, model.config.vocab_size, args.seed)
    length = args.gen_prompt_len + args.gen_max_tokens
    state = getattr(torch, state_dtype)
    llm = LLM(model, max_num_seqs=batch, enable_prefix_caching=False, state_dtype=state,
              memory_gb=budget_gb(model, batch, length, state), max_model_len=length + 16,
              compile_mode=None if compile_mode == "none" else compile_mode)
    params = SamplingParams(temperature=0, max_tokens=args.gen_max_tokens, ignore_eos=True)
    start = time.perf_counter()  # warm-up; with compile_mode, the (shared) decode compile
    llm.generate(prompts[:batch], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    warmup_seconds = time.perf_counter() - start
    log = StepLog(llm)
    runs = []
    for _ in range(args.gen_repeats):
        log.records.clear()
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        runs.append({"seconds": seconds, "output_tokens": tokens, "tok_s": tokens / seconds,
                     "decode_only_tok_s": log.decode_tok_s(), "steps": len(log.records),
                     "load_average": load_average()})
    return {"batch": batch, "state_dtype": state_dtype, "compile": compile_mode,
            "warmup_seconds": warmup_seconds, "prompts": n,
            "prompt_len": args.gen_prompt_len, "max_tokens": args.gen_max_tokens,
            "tok_s": statistics.median(r["tok_s"] for r in runs),
            "decode_only_tok_s": statistics.median(r["decode_only_tok_s"] for r in runs),
            "runs": runs}


def hf_generate(directory: Path, args: argparse.Namespace, vocab: int) -> dict:
    import transformers

    model = transformers.BambaForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()
    ids = torch.tensor(random_prompts(args.hf_batch, args.gen_prompt_len, vocab, args.seed))
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    runs = []
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)
        for _ in range(args.hf_repeats):
            clock = StepClock()
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.gen_max_tokens,
                                 min_new_tokens=args.gen_max_tokens,
                                 logits_processor=transformers.LogitsProcessorList([clock]),
                                 **kwargs)
            seconds = time.perf_counter() - start
            steps = out.shape[1] - ids.shape[1]
            # clock.times[0]: prefill done; every later token is one decode step (as in
            # bench_core), so decode-only counts steps - 1 rows of tokens over the rest.
            decode_s = start + seconds - clock.times[0]
            runs.append({"seconds": seconds, "output_tokens": steps * ids.shape[0],
                         "tok_s": steps * ids.shape[0] / seconds,
                         "decode_only_tok_s": (steps - 1) * ids.shape[0] / decode_s,
                         "load_average": load_average()})
    return {"batch": args.hf_batch, "prompts": args.hf_batch, "prompt_len": args.gen_prompt_len,
            "max_tokens": args.gen_max_tokens, "transformers": transformers.__version__,
            "dtype": "bfloat16", "tok_s": statistics.median(r["tok_s"] for r in runs),
            "decode_only_tok_s": statistics.median(r["decode_only_tok_s"] for r in runs),
            "runs": runs}


def bench_batched(args: argparse.Namespace, dirs: dict[str, Path], cfg: BambaConfig) -> dict:
    model = load(dirs["hybrid"])
    engine = []
    runs = [(b, args.state_dtype) for b in args.gen_batches]
    runs += [(b, "bfloat16") for b in args.gen_bf16_state_batches if args.state_dtype != "bfloat16"]
    for mode in args.gen_compile:
        for b, state in runs:
            engine.append(engine_generate(model, args, b, state, mode))
            print(f"engine b={b} state {state} compile {mode}: {engine[-1]['tok_s']:.1f} output "
                  f"tok/s (decode-only {engine[-1]['decode_only_tok_s']:.1f}; warm-up "
                  f"{engine[-1]['warmup_seconds']:.0f} s)", flush=True)
    del model
    gc.collect()
    hf = hf_generate(dirs["hybrid"], args, cfg.vocab_size)
    print(f"transformers b={args.hf_batch}: {hf['tok_s']:.1f} output tok/s (decode-only "
          f"{hf['decode_only_tok_s']:.1f})", flush=True)
    speedups = {f"{e['compile']}/{e['state_dtype']}": e["tok_s"] / hf["tok_s"] for e in engine
                if e["batch"] == args.hf_batch}
    decode_speedups = {f"{e['compile']}/{e['state_dtype']}":
                       e["decode_only_tok_s"] / hf["decode_only_tok_s"] for e in engine
                       if e["batch"] == args.hf_batch}
    return {"model": "hybrid", "state_dtype": args.state_dtype,
            "compile_note": "compile = LLM(compile_mode=...): decode steps through one inductor "
                            "graph (freezing, dynamic shapes) shared by every engine on the model;"
                            " its compile happens in the first engine's warm-up (warmup_seconds)"
                            " and is excluded from tok_s; prefill chunks run eagerly",
            "throughput_note": "tok_s = all output tokens / wall time of LLM.generate (prefill "
                               "included); decode_only_tok_s = sampled tokens / time of steps "
                               "whose chunks are all one token (transformers: tokens after the "
                               "first / time after the first, as in bench_core)",
            "engine": engine, "transformers": hf,
            "speedup_vs_transformers": speedups,
            "decode_speedup_vs_transformers": decode_speedups}


# ---- prefix cache ------------------------------------------------------------------------
def bench_prefix(args: argparse.Namespace, dirs: dict[str, Path], cfg: BambaConfig) -> dict:
    model = load(dirs["hybrid"])
    state = getattr(torch, args.state_dtype)
    length = args.prefix_len + args.suffix_len
    llm = LLM(model, max_num_seqs=4, enable_prefix_caching=True, state_dtype=state,
              memory_gb=budget_gb(model, 4, length, state, slots_per_seq=2),
              max_model_len=length + 16)
    rng = random.Random(args.seed)
    prefix = [rng.randrange(3, cfg.vocab_size) for _ in range(args.prefix_len)]
    suffixes = random_prompts(2 * args.prefix_requests + 2, args.suffix_len, cfg.vocab_size,
                              args.seed + 1)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

    def ttft(prompt: list[int]) -> float:
        start = time.perf_counter()
        llm.generate([prompt], params)
        return time.perf_counter() - start

    llm.generate([suffixes[-1]], params)  # warm-up, no shared prefix
    uncached = []
    for i in range(args.prefix_requests):
        llm.reset_prefix_cache()
        uncached.append(ttft(prefix + suffixes[i]))
    llm.reset_prefix_cache()
    ttft(prefix + suffixes[-2])  # fills the cache
    cached = [ttft(prefix + suffixes[args.prefix_requests + i])
              for i in range(args.prefix_requests)]
    u, c = statistics.median(uncached), statistics.median(cached)
    return {"model": "hybrid", "prefix_len": args.prefix_len, "suffix_len": args.suffix_len,
            "method": "TTFT = wall time of LLM.generate(prompt, max_tokens=1); uncached: "
                      "reset_prefix_cache() before each request; cached: one request fills the "
                      "cache, then requests with distinct suffixes reuse the prefix",
            "uncached_s": uncached, "cached_s": cached, "uncached_median_s": u,
            "cached_median_s": c, "cached_over_uncached": c / u,
            "hit_rate": llm.stats().prefix_cache_hit_rate, "load_average": load_average()}


# ---- main ----------------------------------------------------------------------------------
def environment(args: argparse.Namespace) -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "logical_cpus": os.cpu_count(),
            "dtype": "bfloat16", "state_dtype": args.state_dtype, "preset": args.preset,
            "seed": args.seed, "command": " ".join(sys.argv),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = preset(args.preset)
    bench = {"context": bench_context, "long": bench_long, "batched": bench_batched,
             "prefix": bench_prefix}
    old = json.loads(args.output.read_text()) if args.output.exists() else {}
    with tempfile.TemporaryDirectory() as work:
        dirs = build_models(cfg, args.seed, Path(work))
        for name in args.only:
            before, start = load_average(), time.perf_counter()
            section = bench[name](args, dirs, cfg)
            section.update(environment=environment(args), shapes=shapes(cfg),
                           load_average_before=before, load_average_after=load_average(),
                           wall_seconds=time.perf_counter() - start)
            old[name] = section
            write_json(args.output, old)
            if name == "context":
                from engine_plots import plot_context

                plot_context(section, args.output.with_name(args.output.stem + "_context.png"))
    print(summary(old))
    return 0


def summary(data: dict) -> str:
    lines = []
    for g in data.get("context", {}).get("generations", []):
        lines.append(f"gen b={g['batch']:>2} {g['prompt']}+{g['outputs']}: hybrid "
                     f"{g['hybrid']['tok_s']:.1f} tok/s, twin {g['twin']['tok_s']:.1f} tok/s, "
                     f"ratio {g['measured_ratio']:.2f} vs predicted {g['predicted_ratio']:.2f} "
                     f"({100 * g['fraction_of_predicted']:.0f}%)")
    for r in data.get("long", {}).get("rows", []):
        lines.append(f"long b={r['batch']} s={r['context']}: hybrid {r['hybrid']['tok_s']:.1f}, "
                     f"twin {r['twin']['tok_s']:.1f} tok/s")
    if "batched" in data:
        for e in data["batched"]["engine"]:
            lines.append(f"engine b={e['batch']} state {e.get('state_dtype')} compile "
                         f"{e.get('compile', 'none')}: "
                         f"{e['tok_s']:.1f} tok/s "
                         f"(decode-only {e['decode_only_tok_s']:.1f})")
        lines.append(f"transformers b={data['batched']['transformers']['batch']}: "
                     f"{data['batched']['transformers']['tok_s']:.1f} tok/s")
    if "prefix" in data:
        p = data["prefix"]
        lines.append(f"prefix TTFT cached {p['cached_median_s']:.3f} s vs uncached "
                     f"{p['uncached_median_s']:.3f} s ({100 * p['cached_over_uncached']:.0f}%)")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
