"""What the benchmarks that pit bamba against llama.cpp measure alike, in one place.

* bamba's side, in a child process of its own (so its resident memory is its own):
  ``rss_mb`` (VmRSS / VmHWM), ``prefill_seconds`` (one forward through a fresh contiguous
  cache, logits for the last position only, as generation needs), ``decode_seconds`` (the
  model's decode step through a contiguous cache, as bench_native.py times it), and
  ``run_child`` to start such a child and read the JSON line it prints last;
* llama.cpp's side: ``run_tool`` (a binary's output, wall time and peak resident memory),
  ``parse_llama_bench`` / ``parse_batched_bench`` (their JSON and JSONL outputs),
  ``run_llama_bench`` / ``run_batched_bench`` (both together; the latter run again when it
  loses its rows);
* the same weights for both: ``write_random`` (a random-weight checkpoint with bench_serve's
  small tokenizer), ``bamba_cli`` (``bamba quantize`` and the like), ``llama_ggufs``
  (llama.cpp's own conversion and quantizations of that checkpoint);
* the scripts' frame: ``add_common_options`` and ``parse_quick`` (options, --quick's smaller
  defaults), ``run_benchmark`` (the parent's run and its JSON report), ``best`` (the best
  round of each figure), ``percentile`` (latency percentiles, one definition for all).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import llama_cpp
from host import describe_host, write_json


CHILD_OPTIONS = ("measure", "length")  # the hidden options of a script's measuring child


class ChildTimeout(RuntimeError):
    """A measuring child or a peer's binary ran past its time budget (and was killed)."""


# ---- bamba's side, in a child process ---------------------------------------------------------
def percentile(values: list[float], q: int) -> float:
    """The q-th percentile of values (statistics' inclusive method: linear interpolation
    between the order statistics; a single value is every percentile)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory in MB: ``VmRSS`` now, ``VmHWM`` its peak so far."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def random_tokens(batch: int, length: int, vocab: int, seed: int = 0) -> Any:
    import torch

    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def prefill_seconds(model: Any, length: int, seed: int = 0) -> float:
    """One forward of a random ``length``-token prompt through a fresh contiguous cache (logits
    of the last position only)."""
    import torch

    from bamba.cache import ContiguousCache

    cache = ContiguousCache(model.config, 1, length, model.dtype)
    tokens = random_tokens(1, length, model.config.vocab_size, seed)
    with torch.inference_mode():
        start = time.perf_counter()
        model(tokens, positions=torch.arange(length)[None], cache=cache, logits_to_keep=1)
        return time.perf_counter() - start


def decode_seconds(model: Any, batch: int, steps: int, context: int = 0,
                   warmup: int = 2) -> float:
    """Median seconds of one decode step of ``batch`` rows through a contiguous cache, over
    ``steps`` steps after ``warmup`` untimed ones; with ``context`` > 0 every row first
    prefills that many random tokens (the steps then run at context .. context + steps)."""
    import torch

    from bamba.cache import ContiguousCache
    from bamba.native import steady_weights

    cache = ContiguousCache(model.config, batch, context + warmup + steps, model.dtype)
    vocab = model.config.vocab_size
    times = []
    with torch.inference_mode(), steady_weights():  # as generate's loop
        if context:
            model(random_tokens(batch, context, vocab), cache=cache, logits_to_keep=1,
                  positions=torch.arange(context).expand(batch, context))
        tokens = random_tokens(batch, 1, vocab, seed=1)
        for i in range(context, context + warmup + steps):
            start = time.perf_counter()
            model(tokens, positions=torch.full((batch, 1), i), cache=cache)
            times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


def run_child(cmd: list[str], timeout: float | None = None) -> dict[str, Any]:
    """Run a measuring child (a script's hidden mode that prints one JSON line last) and return
    that line; RuntimeError with the end of its stderr if it fails, ``ChildTimeout`` (after
    killing it) if it runs past ``timeout`` seconds."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ChildTimeout(f"did not finish within {timeout:g} s (killed)") from None
    if done.returncode != 0:
        raise RuntimeError(f"{Path(cmd[1]).name} {' '.join(cmd[2:4])} exited "
                           f"{done.returncode}: {done.stderr.strip()[-400:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- checkpoints ------------------------------------------------------------------------------
def write_random(directory: Path, config: Any) -> dict[str, Any]:
    """A random-weight bf16 checkpoint of ``config`` with bench_serve's small tokenizer."""
    import torch

    from bamba.analyze import parameter_count
    from bamba.checkpoint import save_pretrained
    from bamba.model import BambaLM, init_weights
    from bench_serve import small_tokenizer

    with torch.device("meta"):  # made in bf16 directly: a float32 copy of a 7B model is 28 GB
        model = BambaLM(config).to(torch.bfloat16)
    model = init_weights(model.to_empty(device="cpu"), seed=0)
    save_pretrained(model, directory, tokenizer=small_tokenizer())
    return {"model_type": config.model_type, "hidden_size": config.hidden_size,
            "layers": config.num_hidden_layers, "attention_layers": list(config.attn_layer_indices),
            "max_position_embeddings": config.max_position_embeddings,
            "parameters": parameter_count(config)}  # a tied head counted once


def bamba_cli(*argv: str) -> None:
    """``bamba ARGV`` in a subprocess (threads not adapted to the load); RuntimeError on failure."""
    cmd = [sys.executable, "-m", "bamba.cli", *argv]
    env = {**os.environ, "BAMBA_ADAPT_THREADS": "0"}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"bamba {' '.join(argv[:2])} failed: {done.stderr.strip()[-400:]}")


def llama_ggufs(source: Path, work: Path, kinds: tuple[str, ...] = ("Q8_0", "Q4_0")
                ) -> dict[str, Path]:
    """llama.cpp's BF16 conversion of ``source`` and its ``llama-quantize`` of that to each of
    ``kinds``; files already in ``work`` are reused."""
    bf16 = work / f"{source.name}-BF16.gguf"
    if not bf16.is_file():
        llama_cpp.convert(source, bf16, "bf16")
    files = {"BF16": bf16}
    for kind in kinds:
        out = work / f"{source.name}-{kind}.gguf"
        if not out.is_file():
            quantize = llama_cpp.find_or_build(tool="llama-quantize")
            llama_cpp._run([str(quantize), str(bf16), str(out), kind], out.with_suffix(".log"),
                           1800)
        files[kind] = out
    return files


# ---- llama.cpp's side ---------------------------------------------------------------------------
class ToolRun(NamedTuple):
    stdout: str
    seconds: float
    peak_rss_mb: float  # the child's VmHWM (file-backed pages of a mapped model included)


def run_tool(cmd: list[str], timeout: float | None = None, poll: float = 0.05) -> ToolRun:
    """Run a peer's binary to the end; its stdout, wall seconds and peak resident memory (its
    VmHWM, read every ``poll`` seconds while it runs: getrusage's ru_maxrss would count the
    forked Python's memory before exec). ``llama_cpp.PeerMissing`` if it fails,
    ``ChildTimeout`` (after killing it) past ``timeout``."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, _peak_mb(proc.pid))
            if timeout is not None and time.perf_counter() - start > timeout:
                proc.kill()
                proc.wait()
                raise ChildTimeout(f"{Path(cmd[0]).name} did not finish within {timeout:g} s "
                                   "(killed)")
            time.sleep(poll)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise llama_cpp.PeerMissing(f"{Path(cmd[0]).name} exited {proc.returncode}: "
                                    f"{stderr.strip()[-300:] or stdout.strip()[-300:]}")
    return ToolRun(stdout, seconds, peak)


def _peak_mb(pid: int) -> float:
    """VmHWM of a running process in MB (0 once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in text.splitlines()
                 if line.startswith("VmHWM:")), 0.0)


def parse_llama_bench(text: str) -> dict[tuple[int, int, int], dict[str, Any]]:
    """``llama-bench -o json`` output -> {(n_prompt, n_gen, n_depth): {tok_s, samples_tok_s}};
    tok_s is its mean over the repetitions."""
    rows = {}
    for row in json.loads(text):
        key = (int(row["n_prompt"]), int(row["n_gen"]), int(row.get("n_depth", 0)))
        rows[key] = {"tok_s": float(row["avg_ts"]),
                     "samples_tok_s": [float(x) for x in row.get("samples_ts", [])]}
    if not rows:
        raise ValueError("llama-bench printed no results")
    return rows


def parse_batched_bench(text: str) -> dict[tuple[int, int, int], dict[str, float]]:
    """``llama-batched-bench --output-format jsonl`` output -> {(pp, tg, pl): {prefill_seconds,
    prefill_tok_s, decode_seconds, decode_tok_s}} (decode tok/s counts every sequence's tokens)."""
    rows = {}
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        row = json.loads(line)
        rows[(int(row["pp"]), int(row["tg"]), int(row["pl"]))] = {
            "prefill_seconds": float(row["t_pp"]), "prefill_tok_s": float(row["speed_pp"]),
            "decode_seconds": float(row["t_tg"]), "decode_tok_s": float(row["speed_tg"])}
    if not rows:
        raise ValueError("llama-batched-bench printed no results")
    return rows


def run_llama_bench(gguf: Path, threads: int, options: list[str], timeout: float | None = None,
                build: bool = True) -> tuple[dict[tuple[int, int, int], dict[str, Any]], float]:
    """``llama-bench`` on one GGUF with ``options`` (-p, -n, -d, -r ...): its parsed rows and
    peak resident memory (MB)."""
    binary = llama_cpp.find_or_build(build=build, tool="llama-bench")
    run = run_tool([str(binary), "-m", str(gguf), "-t", str(threads), *options, "-o", "json"],
                   timeout)
    return parse_llama_bench(run.stdout), run.peak_rss_mb


def run_batched_bench(gguf: Path, threads: int, options: list[str],
                      expect: list[tuple[int, int, int]], tries: int = 3, build: bool = True
                      ) -> dict[tuple[int, int, int], dict[str, float]]:
    """``llama-batched-bench`` on one GGUF with ``options`` (-c, -npp, -ntg, -npl ...), run
    again while a row of ``expect`` (pp, tg, pl) is missing: its logger prints from a thread that
    is never joined at exit, so on a busy host the last rows can be lost (exit code 0)."""
    binary = llama_cpp.find_or_build(build=build, tool="llama-batched-bench")
    cmd = [str(binary), "-m", str(gguf), "-t", str(threads), "-tb", str(threads), *options,
           "--output-format", "jsonl"]
    rows: dict[tuple[int, int, int], dict[str, float]] = {}
    for _ in range(tries):
        try:
            rows.update(parse_batched_bench(run_tool(cmd).stdout))
        except ValueError:  # no row at all this time
            pass
        if all(key in rows for key in expect):
            return rows
    raise llama_cpp.PeerMissing(f"llama-batched-bench printed no row for "
                                f"{[k for k in expect if k not in rows]} in {tries} runs")


# ---- options and the run -------------------------------------------------------------------------
def add_common_options(parser: Any, output: Path, quick: str) -> None:
    """The options every script facing llama.cpp takes: --threads, --llama-cpp, --workdir,
    --quick (``quick`` says what it shrinks), --output (default ``output``), and the hidden
    --measure of its measuring child."""
    parser.add_argument("--threads", type=int, default=2, help="threads of each side")
    parser.add_argument("--llama-cpp", choices=("auto", "cached", "off"), default="auto",
                        help="llama.cpp peer: auto finds or builds it, cached only uses an "
                             "earlier build, off skips it")
    parser.add_argument("--workdir", type=Path,
                        help="keep checkpoints and GGUFs here, else in a temporary directory")
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--output", type=Path, default=output, help="JSON report")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)


def parse_quick(parser: Any, argv: list[str] | None, quick: dict[str, Any]) -> Any:
    """Parse ``argv``; with --quick, its smaller settings for every option left at its default
    (options given explicitly stay)."""
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in quick.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    return args


def run_benchmark(args: Any, title: str, run: Callable[[Path, Any], dict[str, Any]],
                  show: Callable[[dict[str, Any]], None], **extra: Any) -> int:
    """The parent's whole run: torch at --threads, the host described, ``run(work, args)`` in
    --workdir (else a temporary directory), its results, the settings, ``extra`` and the load
    average after it shown by ``show`` and written to --output."""
    import torch

    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "benchmark": title, "host": describe_host(quick=args.quick),
        "settings": {k: str(v) for k, v in vars(args).items() if k not in CHILD_OPTIONS},
        **extra}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        report.update(run(work, args))
    report["load_average_after"] = os.getloadavg()
    show(report)
    write_json(args.output, report)
    print(f"wrote {args.output}")
    return 0


# ---- rounds -----------------------------------------------------------------------------------
def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per figure, the best round: the lowest memory (keys with "mb") or time (keys ending in
    "seconds"), the highest of any other number; other values from the first round."""
    out = {}
    for key, first in runs[0].items():
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        if not isinstance(first, (int, float)) or isinstance(first, bool) or not values:
            out[key] = first
        else:
            out[key] = (min if "mb" in key or key.endswith("seconds") else max)(values)
    return out
