"""Quantized checkpoints against bf16: size, memory, speed and quality, with llama.cpp beside.

For each model shape (--shapes: ``bench``, the Bamba-9B layout at hidden 512, ~173M parameters;
``1b``, the same layout at hidden 1536, ~1.1B) a random-weight bf16 checkpoint is written and
``bamba quantize`` makes its fp8, int8 and int4 versions (the CLI a user runs). Each checkpoint
is then measured in a fresh process of its own (so resident memory is its own), the schemes in
rotation for --rounds rounds (drift hits all alike; the best round is kept):

* size on disk (the safetensors files), resident memory after loading (VmRSS, and above the
  process's baseline before loading: the model's own);
* prefill: one --prompt-token prompt in one forward pass (tok/s, median of 3);
* decode: batch 1 and 8, the model's decode step through a contiguous cache (tok/s, median of
  --steps steps after a warm-up): what ``bamba generate`` and the engine run per token.

This host's memory moves between slow and fast spells that last seconds to minutes (the same
bf16 step ran 45-75 ms within one minute), so a ratio of two processes' figures carries their
spells' luck. Batch-1 decode and prefill are therefore also measured with every scheme in one
process, in turns (--cycles turns of 8 decode steps each, then as many of one prefill; the
same spells hit all): each scheme's median turn and, per turn, its speed-up over bf16's of
that turn, their median reported.

Quality needs trained weights: the demo's model (``bamba demo``, trained on the Python standard
library's source, --trained DIR, or trained here into the work directory) is quantized the same
ways and its perplexity measured by ``bamba eval perplexity`` on held-out text, the standard
library's own tests (``Lib/test``, which training excludes).

llama.cpp (--llama-cpp auto): the same bf16 checkpoint converted by llama.cpp's own converter,
quantized by its ``llama-quantize`` to Q8_0 and Q4_0, measured by ``llama-bench`` (prefill
--prompt-tokens, decode at batch 1) in the same rounds; benchmarks/llama_cpp.py finds or builds
the binaries. bamba also runs those Q8_0 / Q4_0 files themselves in the one-process turns
(``bamba_on_llama_cpp_files``: the same bytes in two runtimes; their Q8_0 / Q4_0 blocks load as
int8 / int4 group 32 with float16 scales, a Q4_0 file's Q6_K output matrix dequantized to bf16),
and llama-bench decodes each file for 16 tokens after every cycle of those turns: bamba's speed
over llama.cpp's within each cycle, their median (``*_one_process_vs_llama_*``), is the
comparison to trust; the rounds' best-of figures come from processes minutes apart.

    python benchmarks/bench_quant.py                        # both shapes, llama.cpp, quality
    python benchmarks/bench_quant.py --shapes bench --llama-cpp off --quality off
    python benchmarks/bench_quant.py --quick                # tiny shape: a smoke test

Writes benchmarks/results/quant.json (--output).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import llama_cpp  # noqa: E402
from host import describe_host, write_json  # noqa: E402
from measure import (bamba_cli, best, decode_seconds, llama_ggufs, prefill_seconds,  # noqa: E402
                     rss_mb, run_child, run_llama_bench, write_random)

RESULTS = Path(__file__).parent / "results" / "quant.json"
SCHEMES = ("bf16", "fp8", "int8", "int8+8", "int4", "int4+8", "int4-asym")
# "int4-asym": int4 with zero points (--asymmetric, llm-compressor's W4A16_ASYM layout).
# "int8+8" and "int4+8": int8 or int4 linears with the lm_head and the token embeddings int8
# too (--lm-head int8 --embedding int8), the layout of llama.cpp's files: its Q8_0 keeps both
# in Q8_0, its Q4_0 the output tensor in Q6_K and the embeddings in Q4_0. The plain schemes
# keep both in bf16, as the quantize command does unless asked.
LLAMA_TYPES = {"bf16": "BF16", "int8": "Q8_0", "int8+8": "Q8_0", "int4": "Q4_0",
               "int4+8": "Q4_0"}  # each scheme's peer among llama.cpp's files
# The shapes: presets of bamba.config with overrides.
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny": ("tiny", {}),
    "bench": ("bench", {}),
    "1b": ("bench", dict(hidden_size=1536, intermediate_size=4096, num_attention_heads=12,
                         num_key_value_heads=4, mamba_n_heads=48)),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["bench", "1b"], choices=sorted(SHAPES))
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    p.add_argument("--group-size", type=int, default=128, help="int4 group size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="rotations over the schemes")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per measurement")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--llama-cpp", choices=("auto", "off"), default="auto")
    p.add_argument("--quality", choices=("on", "off"), default="on",
                   help="perplexity of the trained demo model per scheme")
    p.add_argument("--trained", type=Path, help="a trained checkpoint (else the demo trains one)")
    p.add_argument("--ppl-files", type=int, default=60,
                   help="held-out files scored (Lib/test/test_*.py in name order)")
    p.add_argument("--workdir", type=Path, help="keep checkpoints here (default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="tiny shape, 1 round, no llama.cpp")
    p.add_argument("--output", type=Path, default=RESULTS)
    p.add_argument("--cycles", type=int, default=12,
                   help="turns of the one-process prefill and batch-1 decode over all schemes")
    p.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the per-checkpoint child
    p.add_argument("--one-process", type=Path, nargs="+", help=argparse.SUPPRESS)  # all, one child
    p.add_argument("--llama-turns", action="store_true", help=argparse.SUPPRESS)  # and llama-bench
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.rounds, args.steps, args.llama_cpp = ["tiny"], 1, 4, "off"
        args.cycles = 2
        args.prompt_tokens, args.ppl_files = 128, 4
    return args


# ---- one checkpoint, in its own process ----------------------------------------------------------
def measure(directory: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Resident memory, prefill and decode speed of one checkpoint (run in a child process)."""
    import torch

    from bamba.checkpoint import from_pretrained
    from bamba.native import accelerate

    torch.set_num_threads(args.threads)
    baseline = rss_mb()
    model = accelerate(from_pretrained(directory, dtype=torch.bfloat16).eval())
    loaded = rss_mb()
    prefill = statistics.median(prefill_seconds(model, args.prompt_tokens, seed)
                                for seed in range(3))
    decode = {b: decode_seconds(model, b, args.steps) for b in (1, 8)}
    return {"rss_mb": round(rss_mb(), 1), "rss_model_mb": round(loaded - baseline, 1),
            "prefill_tok_s": round(args.prompt_tokens / prefill, 1),
            "decode_b1_tok_s": round(1 / decode[1], 1), "decode_b8_tok_s": round(8 / decode[8], 1)}


TURN_STEPS = 8  # timed decode steps of one scheme's turn in the one-process measurement
LLAMA_TURN_TOKENS = 16  # llama-bench's batch-1 decode tokens in its turn beside ours


def one_process(directories: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    """Every checkpoint in this process, in turns (--cycles each) of TURN_STEPS batch-1 decode
    steps, then in turns of a prefill of --prompt-tokens (a prefill's tiles just before would
    move the decode steps' figures). Per checkpoint and figure: tok/s of its median turn, and
    the median over turns of the first checkpoint's time divided by its own in the same turn.
    With ``args.llama_turns``, every GGUF file among them also has llama-bench decode
    LLAMA_TURN_TOKENS tokens of it right after each cycle's decode turns (``llama_cpp``: its
    tok/s, and each checkpoint's speed over llama.cpp's in the same cycle, per file)."""
    import torch

    from bamba.checkpoint import from_pretrained
    from bamba.native import accelerate

    torch.set_num_threads(args.threads)
    models = [accelerate(from_pretrained(d, dtype=torch.bfloat16).eval()) for d in directories]
    files = [d for d in directories if Path(d).suffix == ".gguf"] \
        if getattr(args, "llama_turns", False) else []
    decode, llama = [], []
    for _ in range(args.cycles):
        decode.append([decode_seconds(m, 1, TURN_STEPS) for m in models])
        llama.append([llama_decode_seconds(f, args.threads) for f in files])
    prefill = [[prefill_seconds(m, args.prompt_tokens, turn) for m in models]
               for turn in range(args.cycles)]

    def figure(turns: list[list[float]], tokens: int) -> dict[str, list[float]]:
        return {"tok_s": [round(tokens / statistics.median(t[i] for t in turns), 1)
                          for i in range(len(models))],
                "vs_first": [round(r, 2) for r in turn_ratios(turns, [[t[0]] for t in turns])[0]]}

    result: dict[str, Any] = {"decode_b1": figure(decode, 1),
                              "prefill": figure(prefill, args.prompt_tokens)}
    if files:
        result["llama_cpp"] = {
            "files": [str(f) for f in files],
            "decode_b1_tok_s": [round(1 / statistics.median(t[j] for t in llama), 1)
                                for j in range(len(files))],
            "decode_b1_vs_file": [[round(r, 2) for r in row]
                                  for row in turn_ratios(decode, llama)]}
    return result


def turn_ratios(ours: list[list[float]], theirs: list[list[float]]) -> list[list[float]]:
    """[peer j][checkpoint i]: the median over turns of peer j's seconds a token over
    checkpoint i's in the same turn (``ours[turn][i]``, ``theirs[turn][j]``): how many times
    faster checkpoint i ran than the peer, within each turn's memory spell."""
    return [[statistics.median(t[j] / o[i] for o, t in zip(ours, theirs, strict=True))
             for i in range(len(ours[0]))] for j in range(len(theirs[0]))]


def llama_decode_seconds(gguf: Path, threads: int) -> float:
    """Seconds a token of llama-bench's batch-1 decode of LLAMA_TURN_TOKENS tokens (one
    repetition after its warm-up; the binary is already built)."""
    rows, _ = run_llama_bench(Path(gguf), threads, ["-p", "0", "-n", str(LLAMA_TURN_TOKENS),
                                                    "-r", "1"], build=False)
    return 1 / rows[(0, LLAMA_TURN_TOKENS, 0)]["tok_s"]


def measure_in_child(directory: Path, args: argparse.Namespace) -> dict[str, Any]:
    return run_child([sys.executable, __file__, "--measure", str(directory), "--threads",
                      str(args.threads), "--steps", str(args.steps), "--prompt-tokens",
                      str(args.prompt_tokens)])


# ---- checkpoints -------------------------------------------------------------------------------
def write_shape(directory: Path, shape: str) -> dict[str, Any]:
    """A random-weight bf16 checkpoint of the shape, with bench_serve's small tokenizer."""
    from bamba.config import preset

    name, overrides = SHAPES[shape]
    config = preset(name, bos_token_id=1, eos_token_id=2, pad_token_id=0, **overrides)
    return {"preset": name, "overrides": overrides, **write_random(directory, config)}


def quantized(source: Path, scheme: str, args: argparse.Namespace) -> Path:
    """``bamba quantize`` of ``source`` (the bf16 checkpoint itself for bf16)."""
    if scheme == "bf16":
        return source
    out = source.parent / f"{source.name}-{scheme}"
    if not (out / "config.json").is_file():
        name, _, wide = scheme.partition("+")
        name, asymmetric = name.removesuffix("-asym"), name.endswith("-asym")
        extra = ["--group-size", str(args.group_size)] if name == "int4" else []
        extra += ["--asymmetric"] if asymmetric else []
        if wide:
            extra += ["--lm-head", f"int{wide}", "--embedding", f"int{wide}"]
        bamba_cli("quantize", str(source), str(out), "--scheme", name, *extra)
    return out


def disk_mb(directory: Path) -> float:
    return round(sum(f.stat().st_size for f in directory.glob("*.safetensors")) / 1e6, 1)


# ---- llama.cpp ---------------------------------------------------------------------------------
def llama_bench(gguf: Path, args: argparse.Namespace) -> dict[str, Any]:
    """llama-bench's prefill (--prompt-tokens) and batch-1 decode (64 tokens) of one GGUF."""
    rows, _ = run_llama_bench(gguf, args.threads, ["-p", str(args.prompt_tokens), "-n", "64",
                                                   "-r", "3"])
    return {"size_mb": round(gguf.stat().st_size / 1e6, 1),
            "prefill_tok_s": round(rows[(args.prompt_tokens, 0, 0)]["tok_s"], 1),
            "decode_b1_tok_s": round(rows[(0, 64, 0)]["tok_s"], 1)}


# ---- quality -----------------------------------------------------------------------------------
def held_out_files() -> list[Path]:
    """The standard library's tests: Python source that the demo's training excludes."""
    tests = Path(sysconfig.get_paths()["stdlib"]) / "test"
    return sorted(tests.glob("test_*.py"))


def trained_checkpoint(args: argparse.Namespace, work: Path) -> Path:
    if args.trained is not None:
        return args.trained
    from bamba.demo import trained_checkpoint as exported

    demo = work / "demo"
    bamba_cli("demo", "--dir", str(demo), "--prompt", "import os")
    return exported(demo)


def perplexity(directory: Path, args: argparse.Namespace, out: Path) -> float:
    files = held_out_files()[:args.ppl_files]
    bamba_cli("eval", "perplexity", str(directory), *map(str, files), "--context", "256",
              "--dtype", "bfloat16", "--out", str(out))
    result = json.loads((out / "perplexity.json").read_text())
    return result["perplexity"], result["tokens"]


# ---- the run -----------------------------------------------------------------------------------
def run_shape(shape: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    source = work / f"{shape}-bf16"
    info = write_shape(source, shape)
    dirs = {s: quantized(source, s, args) for s in args.schemes}
    ggufs: dict[str, Path] = {}
    missing = None
    if args.llama_cpp == "auto":
        try:
            ggufs = llama_ggufs(source, work)
        except llama_cpp.PeerMissing as exc:
            missing = str(exc)
    runs: dict[str, list] = {s: [] for s in [*args.schemes, *ggufs]}
    for round_ in range(args.rounds):
        for scheme in args.schemes:
            runs[scheme].append(measure_in_child(dirs[scheme], args))
            print(json.dumps({"shape": shape, "round": round_, scheme: runs[scheme][-1]}),
                  flush=True)
        for kind, gguf in ggufs.items():
            runs[kind].append(llama_bench(gguf, args))
            print(json.dumps({"shape": shape, "round": round_, kind: runs[kind][-1]}), flush=True)
    bamba = {s: {"disk_mb": disk_mb(dirs[s]), **best(runs[s])} for s in args.schemes}
    on_files: dict[str, dict[str, Any]] = {}  # bamba running llama.cpp's own GGUF files
    if "bf16" in dirs and len(dirs) > 1:  # bf16 first: the ratios' base
        order = ["bf16", *(s for s in args.schemes if s != "bf16")]
        files = [k for k in ("Q8_0", "Q4_0") if k in ggufs]  # llama.cpp's files, read by bamba
        together = run_child([sys.executable, __file__, "--threads", str(args.threads),
                              "--cycles", str(args.cycles), "--prompt-tokens",
                              str(args.prompt_tokens), *(["--llama-turns"] if files else []),
                              "--one-process", *(str(dirs[s]) for s in order),
                              *(str(ggufs[k]) for k in files)])
        print(json.dumps({"shape": shape, "one_process": together}), flush=True)
        paired = together.pop("llama_cpp", None)
        for figure, values in together.items():
            for i, s in enumerate(order):
                bamba[s][f"{figure}_one_process_tok_s"] = values["tok_s"][i]
                bamba[s][f"{figure}_one_process_vs_bf16"] = values["vs_first"][i]
            for i, k in enumerate(files, start=len(order)):
                on_files.setdefault(k, {})[f"{figure}_one_process_tok_s"] = values["tok_s"][i]
                on_files[k][f"{figure}_one_process_vs_bf16"] = values["vs_first"][i]
        if paired is not None:  # llama-bench's turns on its files, beside ours
            for j, k in enumerate(files):
                vs_file = paired["decode_b1_vs_file"][j]
                on_files[k]["llama_cpp_decode_b1_one_process_tok_s"] = \
                    paired["decode_b1_tok_s"][j]
                on_files[k]["decode_b1_one_process_vs_llama_cpp"] = vs_file[len(order) + j]
                for i, s in enumerate(order):
                    if LLAMA_TYPES.get(s) == k:
                        bamba[s][f"decode_b1_one_process_vs_llama_{k}"] = vs_file[i]
    base = bamba.get("bf16")
    for s, row in bamba.items():
        if base is not None:
            row["disk_vs_bf16"] = round(row["disk_mb"] / base["disk_mb"], 3)
            row["decode_b1_vs_bf16"] = round(row["decode_b1_tok_s"] / base["decode_b1_tok_s"], 2)
            row["prefill_vs_bf16"] = round(row["prefill_tok_s"] / base["prefill_tok_s"], 2)
        peer = LLAMA_TYPES.get(s)
        if peer in ggufs:
            row[f"decode_b1_vs_llama_{peer}"] = round(
                row["decode_b1_tok_s"] / best(runs[peer])["decode_b1_tok_s"], 2)
    for k, row in on_files.items():  # the same file, llama.cpp's llama-bench against bamba
        theirs = best(runs[k])
        for figure in ("decode_b1", "prefill"):
            row[f"{figure}_vs_llama_cpp"] = round(
                row[f"{figure}_one_process_tok_s"] / theirs[f"{figure}_tok_s"], 2)
    return {"model": info, "bamba": bamba, "bamba_on_llama_cpp_files": on_files,
            "llama_cpp": {k: best(runs[k]) for k in ggufs} if ggufs else {"missing": missing}}


def run_quality(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    source = trained_checkpoint(args, work)
    rows = {}
    for scheme in args.schemes:
        directory = quantized(source, scheme, args) if scheme != "bf16" else source
        ppl, tokens = perplexity(directory, args, work / f"ppl-{scheme}")
        rows[scheme] = {"perplexity": round(ppl, 4), "tokens": tokens}
    if "bf16" in rows:
        for row in rows.values():
            row["vs_bf16"] = round(row["perplexity"] / rows["bf16"]["perplexity"] - 1, 4)
    return {"checkpoint": "given" if args.trained else "bamba demo (trained here)",
            "held_out": f"the first {args.ppl_files} of Lib/test/test_*.py", "schemes": rows}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args)))
        return 0
    if args.one_process is not None:
        print(json.dumps(one_process(args.one_process, args)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result: dict[str, Any] = {"benchmark": "quant", "host": describe_host(quick=args.quick),
                                  "settings": {k: str(v) for k, v in vars(args).items()}}
        result["shapes"] = {shape: run_shape(shape, work, args) for shape in args.shapes}
        if args.quality == "on":
            result["quality"] = run_quality(work, args)
        result["load_average_after"] = os.getloadavg()
    write_json(args.output, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
