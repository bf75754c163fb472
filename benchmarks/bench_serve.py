"""Server benchmark: requests/s, output tok/s and time to first token under concurrent load.

One run: writes a random-weight checkpoint (--preset, default the bench shape), starts
``bamba serve`` on it in a subprocess on 127.0.0.1, and from this (separate) process keeps
C streaming /v1/completions requests in flight for each concurrency C in --concurrency. Every
request has its own random --prompt-token prompt (no prefix-cache hits) and generates exactly
--max-tokens tokens (ignore_eos). TTFT is measured by the client from sending the request to
the first streamed token. For comparison, after the server is stopped, the same requests at the
highest concurrency run through the offline engine (``LLM.generate``) in this process: the gap
is the cost of HTTP, JSON and SSE. Writes benchmarks/results/serve.json and prints a table.

    python benchmarks/bench_serve.py            # bench shape, bf16, 2 threads
    python benchmarks/bench_serve.py --quick    # tiny shape, seconds: a smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch

sys.path.insert(0, str(Path(__file__).parent))
from host import describe_host, write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "serve.json"
NAME = "bench"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="bench")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=2, help="server torch threads")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=None,
                   help="requests per level (default: max(8, 2 x concurrency))")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--memory-gb", type=float, default=1.0)
    p.add_argument("--quick", action="store_true", help="tiny model, few requests")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.concurrency, args.max_tokens, args.prompt_tokens = "tiny", [1, 8], 16, 32
    return args


# ---- checkpoint ------------------------------------------------------------------------------
def write_checkpoint(directory: Path, preset_name: str) -> dict[str, Any]:
    """A random-weight model of the preset's shape, with a small byte-level BPE tokenizer."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from bamba.checkpoint import save_pretrained
    from bamba.config import preset
    from bamba.model import BambaLM, init_weights
    from bamba.tokenizer import Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(["state space models and attention layers"], trainer=trainer)
    tokenizer = Tokenizer(backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    config = preset(preset_name, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = init_weights(BambaLM(config), seed=0)
    save_pretrained(model, directory, tokenizer=tokenizer)
    return {"preset": preset_name, "parameters": sum(p.numel() for p in model.parameters()),
            "hidden_size": config.hidden_size, "layers": config.num_hidden_layers,
            "attention_layers": list(config.attn_layer_indices), "vocab_size": config.vocab_size}


# ---- server ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(directory: Path, port: int, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bamba.cli", "serve", str(directory), "--port", str(port),
           "--served-model-name", NAME, "--dtype", args.dtype, "--threads", str(args.threads),
           "--memory-gb", str(args.memory_gb), "--max-num-seqs", str(max(args.concurrency)),
           "--log-level", "warning"]
    env = {k: v for k, v in os.environ.items() if k != "BAMBA_API_KEY"}
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("the server did not come up in 300 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---- client ----------------------------------------------------------------------------------
def prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(count)]


async def one_request(http: httpx.AsyncClient, prompt: list[int], max_tokens: int
                      ) -> dict[str, float]:
    body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first, tokens = None, 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"status {r.status_code}: {await r.aread()!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = json.loads(line[6:])
            if "error" in payload:
                raise RuntimeError(payload["error"]["message"])
            if payload.get("usage"):
                tokens = payload["usage"]["completion_tokens"]
            elif first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    if first is None or tokens != max_tokens:
        raise RuntimeError(f"expected {max_tokens} streamed tokens, got {tokens}")
    return {"ttft": first - sent, "latency": end - sent, "tokens": tokens,
            "tpot": (end - first) / max(tokens - 1, 1)}


async def load(base: str, batch: list[list[int]], concurrency: int, max_tokens: int
               ) -> tuple[list[dict[str, float]], float]:
    gate = asyncio.Semaphore(concurrency)

    async def gated(http: httpx.AsyncClient, prompt: list[int]) -> dict[str, float]:
        async with gate:
            return await one_request(http, prompt, max_tokens)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        results = await asyncio.gather(*(gated(http, p) for p in batch))
        return list(results), time.perf_counter() - start


def percentile(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summarize(results: list[dict[str, float]], wall: float) -> dict[str, float]:
    ttft = [r["ttft"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "wall_s": round(wall, 3),
            "requests_per_s": round(len(results) / wall, 3),
            "output_tok_per_s": round(tokens / wall, 1),
            "ttft_p50_s": round(percentile(ttft, 50), 4),
            "ttft_p90_s": round(percentile(ttft, 90), 4),
            "ttft_p99_s": round(percentile(ttft, 99), 4),
            "latency_p50_s": round(statistics.median(r["latency"] for r in results), 4),
            "tpot_median_ms": round(1000 * statistics.median(r["tpot"] for r in results), 2)}


def metric(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines()
                if line.split(" ")[0] == name)


# ---- offline comparison ----------------------------------------------------------------------
def offline(directory: Path, batch: list[list[int]], args: argparse.Namespace,
            concurrency: int) -> dict[str, float]:
    """The same requests through ``LLM.generate`` in this process, at most ``concurrency``
    sequences at a time: the engine without HTTP. It runs on a worker thread, as the server's
    engine does, so that both sides drive torch's OpenMP threads from the same kind of thread
    (on a loaded machine the main thread's spinning made them far slower: benchmarks/README.md,
    Server)."""
    from bamba.engine import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    llm = LLM(str(directory), dtype=args.dtype, memory_gb=args.memory_gb,
              max_num_seqs=concurrency)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    timing: dict[str, Any] = {}

    def work() -> None:
        llm.generate(batch[:2], params)  # warm-up
        llm.reset_prefix_cache()
        start = time.perf_counter()
        timing["outputs"] = llm.generate(batch, params)
        timing["wall"] = time.perf_counter() - start

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    wall, outputs = timing["wall"], timing["outputs"]
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"requests": len(batch), "wall_s": round(wall, 3),
            "requests_per_s": round(len(batch) / wall, 3),
            "output_tok_per_s": round(tokens / wall, 1)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report: dict[str, Any] = {
        "benchmark": "bamba serve under concurrent streaming load",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "load_average_at_start": os.getloadavg()},
        "host": describe_host(),
        "settings": {"dtype": args.dtype, "server_threads": args.threads,
                     "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
                     "memory_gb": args.memory_gb, "sampling": "greedy, ignore_eos",
                     "client": "separate process, httpx asyncio, SSE"},
        "levels": []}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "ckpt"
        report["model"] = info = write_checkpoint(directory, args.preset)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        proc = start_server(directory, port, args)
        batches = {}
        try:
            asyncio.run(load(base, prompts(2, args.prompt_tokens, info["vocab_size"], 99), 2,
                             args.max_tokens))  # warm-up
            for c in args.concurrency:
                n = args.requests or max(8, 2 * c)
                batches[c] = prompts(n, args.prompt_tokens, info["vocab_size"], seed=c)
                results, wall = asyncio.run(load(base, batches[c], c, args.max_tokens))
                level = {"concurrency": c, **summarize(results, wall)}
                report["levels"].append(level)
                print(json.dumps(level), flush=True)
            text = httpx.get(base + "/metrics").text
            report["server_metrics_after"] = {
                name: metric(text, name) for name in (
                    "bamba_kv_blocks_in_use", "bamba_state_slots_in_use",
                    "bamba_requests_running", "bamba_time_to_first_token_seconds_count",
                    "bamba_generation_tokens_total", "bamba_preemptions_total")}
        finally:
            stop_server(proc)
        top = max(args.concurrency)
        report["offline_engine"] = {"concurrency": top,
                                    **offline(directory, batches[top], args, top)}
    served = next(lv for lv in report["levels"] if lv["concurrency"] == top)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    report["server_vs_offline_tok_per_s"] = round(
        served["output_tok_per_s"] / report["offline_engine"]["output_tok_per_s"], 3)
    print_table(report)
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


def print_table(report: dict[str, Any]) -> None:
    print(f"\nmodel {report['model']['preset']} ({report['model']['parameters'] / 1e6:.1f}M "
          f"params), {report['settings']}")
    print(f"{'conc':>5} {'reqs':>5} {'req/s':>7} {'tok/s':>7} {'TTFT p50':>9} {'p90':>7} "
          f"{'p99':>7} {'TPOT ms':>8}")
    for lv in report["levels"]:
        print(f"{lv['concurrency']:>5} {lv['requests']:>5} {lv['requests_per_s']:>7.2f} "
              f"{lv['output_tok_per_s']:>7.1f} {lv['ttft_p50_s']:>9.3f} {lv['ttft_p90_s']:>7.3f} "
              f"{lv['ttft_p99_s']:>7.3f} {lv['tpot_median_ms']:>8.1f}")
    off = report["offline_engine"]
    print(f"offline LLM.generate at concurrency {off['concurrency']}: "
          f"{off['output_tok_per_s']:.1f} tok/s, {off['requests_per_s']:.2f} req/s; "
          f"server/offline = {report['server_vs_offline_tok_per_s']}")


if __name__ == "__main__":
    sys.exit(main())
