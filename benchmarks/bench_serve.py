"""Server benchmark: `bamba serve` against its own offline engine and llama.cpp's llama-server.

One run writes a random-weight checkpoint (--preset, default the bench shape) and, from this
(separate) process, sends the same client load to each side on 127.0.0.1, at every concurrency
C in --concurrency (default 1 4 8 32): C streaming /v1/completions requests kept in flight,
each with its own random --prompt-tokens prompt (token ids: no prefix-cache hits) generating a
length drawn around --max-tokens (--output-spread; greedy, ignore_eos), so requests end at
different times and newcomers' prompts are prefilled while others decode. Per level: output tok/s, time to first token
(TTFT, from sending to the first streamed token) p50/p99 and inter-token latency (ITL, the gap
between two streamed events of one request; one event is one token unless the reader fell
behind) p50/p99 over all gaps. Concurrency 1 is also run non-streaming (seconds a request).
All sides stay up for the whole run and each level is measured --rounds times, the sides in
rotating order within each round (host drift hits all alike: this host's speed moves by up to
15% over minutes), on prompts new to every server each round; each level keeps its best round.
At concurrency 1 the sides take turns request by request (each prompt on every side back to
back, the first side rotating), so the requests a ratio compares ran within a second or two of
each other: whole levels of one side after another (~5 s each) gave per-round ratios from 0.87
to 1.03 for the same code.
The report holds every round's tok/s and inter-token p50/p99 (``rounds_*``), and the server's
and client's CPU a token (and bamba's
engine thread's time in and between steps a token, from its /metrics). The ratios to trust are
``ratios``: per level, bamba's tok/s over the offline engine's and over llama-server's in each
round (the sides measured back to back) and their median; a ratio of two best rounds carries
two spells' luck.

Sides: ``bamba`` (``bamba serve`` in a subprocess, --threads torch threads); ``offline``
(``LLM.generate`` in this process on a worker thread, as the server's engine runs: one request
after another at concurrency 1, else the level's requests with max_num_seqs=C); ``llama.cpp``
(``llama-server -np max(C) -t threads`` on a GGUF of the same weights made by llama.cpp's
converter; benchmarks/llama_cpp.py finds or builds it, see there). If the peer cannot be found,
built or loaded, bamba's side still runs and the JSON says why (``llama_cpp.missing``).

    python benchmarks/bench_serve.py                      # bench shape, bf16, 2 threads
    python benchmarks/bench_serve.py --llama-cpp off      # bamba and offline only
    python benchmarks/bench_serve.py --quick --llama-cpp off   # tiny shape: a smoke test

Re-runnable: the checkpoint and GGUF live in a temporary directory, llama.cpp's build in
~/.cache/bamba/llama.cpp/<version> (reused). Writes benchmarks/results/serve.json (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import torch

from bamba.cores import in_passing_thread
from bamba.serve.http import event_loop, http_protocol

sys.path.insert(0, str(Path(__file__).parent))
import llama_cpp  # noqa: E402
from host import describe_host, write_json  # noqa: E402
from measure import percentile  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "serve.json"
NAME = "bench"
REQUEST_TIMEOUT_S = 600
# bamba serve's /metrics counters of its engine thread's time (inside steps, between them)
ENGINE_COUNTERS = ("engine_step", "engine_between_steps")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="bench", help="model shape (bamba.config.preset)")
    p.add_argument("--dtype", default="bfloat16", help="weights of both servers")
    p.add_argument("--threads", type=int, default=2, help="threads of each server and offline")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 32],
                   help="requests kept in flight, one level each")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per level (default: max(8, 4 x concurrency): past the first "
                        "wave, which arrives at once, into staggered arrivals)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length")
    p.add_argument("--max-tokens", type=int, default=64,
                   help="tokens a request generates, on average (see --output-spread)")
    p.add_argument("--output-spread", type=float, default=0.5,
                   help="each request generates a length drawn uniformly from max-tokens x "
                        "(1 -/+ spread), the same for every side (0: all alike, so requests "
                        "finish and arrive in waves)")
    p.add_argument("--memory-gb", type=float, default=1.0, help="bamba's KV blocks and slots")
    p.add_argument("--http", choices=("auto", "httptools", "h11"), default="auto",
                   help="bamba serve's HTTP implementation")
    p.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                   help="bamba serve's event loop")
    p.add_argument("--rounds", type=int, default=None,
                   help="rotations over the sides, each level keeping its best round, the "
                        "ratios their median (default 3, --quick 1)")
    p.add_argument("--llama-cpp", choices=("auto", "cached", "off"), default="auto",
                   help="llama-server peer: auto finds or builds it, cached only uses "
                        "$LLAMA_SERVER or an earlier build, off skips it")
    p.add_argument("--quick", action="store_true", help="tiny model, few requests")
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON report")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.concurrency, args.max_tokens, args.prompt_tokens = "tiny", [1, 4], 8, 16
        args.requests = args.requests or 4
    args.rounds = args.rounds or (1 if args.quick else 3)
    if min(args.concurrency) < 1 or args.max_tokens < 2 or args.prompt_tokens < 1:
        p.error("--concurrency, --prompt-tokens must be >= 1 and --max-tokens >= 2")
    if not 0 <= args.output_spread < 1:
        p.error("--output-spread must lie in [0, 1)")
    return args


# ---- checkpoint ------------------------------------------------------------------------------
def small_tokenizer() -> Any:
    """A small byte-level BPE tokenizer (prompts are sent as token ids anyway)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from bamba.tokenizer import Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(["state space models and attention layers"], trainer=trainer)
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def write_checkpoint(directory: Path, preset_name: str) -> dict[str, Any]:
    """A random-weight model of the preset's shape, with a small byte-level BPE tokenizer."""
    from bamba.checkpoint import save_pretrained
    from bamba.config import preset
    from bamba.model import BambaLM, init_weights

    config = preset(preset_name, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = init_weights(BambaLM(config), seed=0)
    save_pretrained(model, directory, tokenizer=small_tokenizer())
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
           "--http", args.http, "--loop", args.loop, "--log-level", "warning"]
    env = {k: v for k, v in os.environ.items() if k != "BAMBA_API_KEY"}
    proc = subprocess.Popen(cmd, env=env)
    why = llama_cpp.wait_healthy(proc, port)
    if why is not None:
        raise RuntimeError(f"bamba serve {why}")
    return proc


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


Request = tuple[list[int], int]  # a prompt's token ids, the tokens to generate


def requests(count: int, args: argparse.Namespace, seed: int) -> list[Request]:
    """``count`` random prompts, each with its output length (--max-tokens, spread by
    --output-spread, at least 2)."""
    rng = random.Random(seed + 1)
    low = max(2, round(args.max_tokens * (1 - args.output_spread)))
    return [(prompt, rng.randint(low, max(low, longest_output(args))))
            for prompt in prompts(count, args.prompt_tokens, args.vocab, seed)]


def longest_output(args: argparse.Namespace) -> int:
    return round(args.max_tokens * (1 + args.output_spread))


def warm_up(port: int, args: argparse.Namespace) -> None:
    asyncio.run(load(port, [(p, args.max_tokens) for p in prompts(
        2, args.prompt_tokens, args.vocab, seed=99)], 2))


async def post(port: int, body: dict[str, Any]) -> AsyncIterator[bytes]:
    """POST ``body`` as JSON to /v1/completions over a fresh HTTP/1.1 connection to
    127.0.0.1:port; yield the response body's pieces as they arrive (chunked, by
    Content-Length or until the server closes). RuntimeError for a status other than 200.

    A raw asyncio client, not httpx: on two cores the client's CPU is taken from the server it
    measures (httpx's streaming reader cost ~0.5 ms a streamed token here, this one a fraction
    of it; each level records the client's CPU a token)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        payload = json.dumps(body).encode()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
        await writer.drain()
        status_line, *lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (line.partition(":") for line in lines if line)}
        pieces = _chunks(reader) if "chunked" in headers.get("transfer-encoding", "") else \
            _plain(reader, headers.get("content-length"))
        status = int(status_line.split()[1])
        if status != 200:
            text = b"".join([piece async for piece in pieces])
            raise RuntimeError(f"status {status}: {text[:200]!r}")
        async for piece in pieces:
            yield piece
    finally:
        writer.close()


async def _chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """A chunked body's chunks."""
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
        yield (await reader.readexactly(size + 2))[:-2]
    await reader.readuntil(b"\r\n")  # the (empty) trailer


async def _plain(reader: asyncio.StreamReader, length: str | None) -> AsyncIterator[bytes]:
    if length is not None:
        yield await reader.readexactly(int(length))
        return
    while piece := await reader.read(1 << 16):
        yield piece


async def one_request(port: int, prompt: list[int], max_tokens: int,
                      stream: bool) -> dict[str, Any]:
    """One completion; its TTFT, latency and the gaps between its streamed events (an event's
    time: when the piece of the body holding it arrived)."""
    body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    sent = time.perf_counter()
    if not stream:
        answer = json.loads(b"".join([piece async for piece in post(port, body)]))
        return _result(sent, None, [], answer["usage"]["completion_tokens"], max_tokens)
    events: list[float] = []
    tokens, pending = None, b""
    async for piece in post(port, body):
        now = time.perf_counter()
        *complete, pending = (pending + piece).split(b"\n\n")
        for event in complete:
            if not event.startswith(b"data: ") or event == b"data: [DONE]":
                continue
            payload = json.loads(event[6:])
            if "error" in payload:
                raise RuntimeError(str(payload["error"])[:200])
            if payload.get("usage"):
                tokens = payload["usage"]["completion_tokens"]
            if payload.get("choices"):
                events.append(now)
    return _result(sent, events[0] if events else None, events,
                   len(events) if tokens is None else tokens, max_tokens)


def _result(sent: float, first: float | None, events: list[float], tokens: int,
            max_tokens: int) -> dict[str, Any]:
    end = time.perf_counter()
    if tokens != max_tokens:
        raise RuntimeError(f"expected {max_tokens} tokens, got {tokens}")
    return {"ttft": None if first is None else first - sent, "latency": end - sent,
            "tokens": tokens, "gaps": [b - a for a, b in zip(events, events[1:])]}


async def load(port: int, batch: list[Request], concurrency: int,
               stream: bool = True) -> tuple[list[dict[str, Any]], float]:
    """The batch's requests, ``concurrency`` in flight, each on a connection of its own
    (loopback: well under a millisecond; llama-server's HTTP library closes kept-alive
    connections on its own schedule, and a request sent on one it is closing fails)."""
    gate = asyncio.Semaphore(concurrency)

    async def gated(prompt: list[int], max_tokens: int) -> dict[str, Any]:
        async with gate, asyncio.timeout(REQUEST_TIMEOUT_S):
            return await one_request(port, prompt, max_tokens, stream)

    start = time.perf_counter()
    results = await asyncio.gather(*(gated(p, n) for p, n in batch))
    return list(results), time.perf_counter() - start


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), or of this one."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summarize(results: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    tokens = sum(r["tokens"] for r in results)
    summary = {"requests": len(results), "wall_s": round(wall, 3),
               "output_tok_per_s": round(tokens / wall, 1),
               "seconds_per_request": round(statistics.mean(r["latency"] for r in results), 4)}
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    gaps = [g for r in results for g in r["gaps"]]
    if ttft:
        summary.update(ttft_p50_s=round(percentile(ttft, 50), 4),
                       ttft_p99_s=round(percentile(ttft, 99), 4))
    if gaps:
        summary.update(itl_p50_ms=round(1000 * percentile(gaps, 50), 2),
                       itl_p99_ms=round(1000 * percentile(gaps, 99), 2))
    return summary


def measure(port: int, server_pid: int, c: int, batch: list[Request], stream: bool,
            counters: Callable[[], dict[str, float]] | None = None) -> dict[str, Any]:
    """The batch against a server, ``c`` in flight: each request's result, the wall time, the
    server's and this client's CPU seconds, and the growth of the server's ``counters``."""
    before = counters() if counters else {}
    server, client = cpu_seconds(server_pid), cpu_seconds()
    results, wall = asyncio.run(load(port, batch, c, stream))
    server, client = cpu_seconds(server_pid) - server, cpu_seconds() - client
    after = counters() if counters else {}
    return {"results": results, "wall": wall, "server_cpu": server, "client_cpu": client,
            "counters": {name: after[name] - before[name] for name in after}}


def level_of(c: int, stream: bool, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One level from its measured parts (one, or at concurrency 1 one a request): the summary
    over all their requests, their wall times added, and CPU and counters a generated token."""
    results = [r for part in parts for r in part["results"]]
    tokens = sum(r["tokens"] for r in results)
    level = {"concurrency": c, "stream": stream,
             **summarize(results, sum(part["wall"] for part in parts))}
    if "batched" in parts[0]:  # one generate call for the level's requests
        level.update(requests=sum(p["batched"] for p in parts), seconds_per_request=None)
    if "server_cpu" in parts[0]:
        level.update(server_cpu_ms_per_token=round(
            1000 * sum(p["server_cpu"] for p in parts) / tokens, 3),
            client_cpu_ms_per_token=round(1000 * sum(p["client_cpu"] for p in parts) / tokens, 3))
        level.update({f"{name}_ms_per_token": round(
            1000 * sum(p["counters"][name] for p in parts) / tokens, 3)
            for name in parts[0]["counters"]})
    return level


def metric(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines()
                if line.split(" ")[0] == name)


# ---- sides -----------------------------------------------------------------------------------
class BambaSide:
    """``bamba serve`` in a subprocess, warmed up, loaded level by level."""

    def __init__(self, directory: Path, args: argparse.Namespace):
        self.args, self.port = args, free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = start_server(directory, self.port, args)
        warm_up(self.port, args)

    def measure(self, c: int, batch: list[Request], stream: bool) -> dict[str, Any]:
        return measure(self.port, self.proc.pid, c, batch, stream,
                       counters=lambda: {name: metric(
                           httpx.get(self.base + "/metrics").text,
                           f"bamba_{name}_seconds_total") for name in ENGINE_COUNTERS})

    def close(self) -> dict[str, Any]:
        """Its pools after the load (all free again), then the server stopped."""
        try:
            text = httpx.get(self.base + "/metrics").text
            return {"server_metrics_after": {name: metric(text, name) for name in (
                "bamba_kv_blocks_in_use", "bamba_state_slots_in_use", "bamba_requests_running",
                "bamba_generation_tokens_total", "bamba_preemptions_total")}}
        finally:
            stop_server(self.proc)


class LlamaSide:
    """llama-server on a GGUF of the same weights made by llama.cpp's converter (raises
    llama_cpp.PeerMissing when it cannot be found, built or loaded), warmed up."""

    def __init__(self, directory: Path, args: argparse.Namespace):
        binary = llama_cpp.find_or_build(build=args.llama_cpp == "auto")
        outtype = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}.get(args.dtype)
        if outtype is None:
            raise llama_cpp.PeerMissing(f"no GGUF type for --dtype {args.dtype}")
        self.gguf = llama_cpp.convert(directory, directory.parent / f"model-{outtype}.gguf",
                                      outtype)
        self.args, self.port = args, free_port()
        self.proc = llama_cpp.start(binary, self.gguf, self.port, args.threads,
                                    max(args.concurrency),
                                    args.prompt_tokens + longest_output(args) + 16)
        self.info = {"binary": str(binary), "version": llama_cpp.VERSION, "gguf_type": outtype,
                     "parallel_slots": max(args.concurrency)}
        warm_up(self.port, args)

    def measure(self, c: int, batch: list[Request], stream: bool) -> dict[str, Any]:
        return measure(self.port, self.proc.pid, c, batch, stream)

    def failure(self, exc: Exception) -> str:
        log = self.gguf.with_suffix(".server.log").read_text(errors="replace").strip()
        return (f"llama-server failed under load: {exc!r}; its log ends: "
                f"{log.splitlines()[-3:] if log else 'no output'}")

    def close(self) -> dict[str, Any]:
        stop_server(self.proc)
        return dict(self.info)


class OfflineSide:
    """The same requests through ``LLM.generate`` in this process, on a worker thread (as the
    server's engine runs): one after another at concurrency 1, else together with
    max_num_seqs=C (an engine a concurrency, made on first use). Streaming does not apply."""

    def __init__(self, directory: Path, args: argparse.Namespace):
        from bamba.engine import SamplingParams

        self.directory, self.args, self.engines = directory, args, {}
        self.params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
        # every engine runs on this one thread, as the server's on its engine thread
        self.worker = concurrent.futures.ThreadPoolExecutor(1, "offline-engine")
        torch.set_num_threads(args.threads)

    def measure(self, c: int, batch: list[Request], stream: bool) -> dict[str, Any]:
        from bamba.engine import LLM, SamplingParams

        if c not in self.engines:
            llm = in_passing_thread(lambda: LLM(
                str(self.directory), dtype=self.args.dtype, memory_gb=self.args.memory_gb,
                max_num_seqs=c))
            warm = prompts(2, self.args.prompt_tokens, self.args.vocab, 99)
            self.worker.submit(llm.generate, warm, self.params).result()
            self.engines[c] = llm
        llm = self.engines[c]
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in batch]
        calls: list[Callable[[], list]] = \
            [lambda p=p, q=q: llm.generate(p, q) for (p, _), q in zip(batch, params)] \
            if c == 1 else [lambda: llm.generate([p for p, _ in batch], params)]
        part = self.worker.submit(_timed_calls, llm, calls).result()
        return part if c == 1 else {**part, "batched": len(batch)}

    def close(self) -> dict[str, Any]:
        self.worker.shutdown()
        self.engines.clear()
        return {}


def _timed_calls(llm: Any, calls: list[Callable[[], list]]) -> dict[str, Any]:
    """Each call's tokens and seconds (one request each at concurrency 1, else one batch)."""
    llm.reset_prefix_cache()
    results, start = [], time.perf_counter()
    for call in calls:
        began = time.perf_counter()
        outputs = call()
        results.append({"ttft": None, "gaps": [], "latency": time.perf_counter() - began,
                        "tokens": sum(len(o.outputs[0].token_ids) for o in outputs)})
    return {"results": results, "wall": time.perf_counter() - start}


def run_rotation(sides: dict[str, Any], counts: dict[int, int], args: argparse.Namespace,
                 failed: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """Every level (each concurrency streaming, concurrency 1 also non-streaming) --rounds
    times, every side once a round in rotating order (at concurrency 1, request by request),
    on prompts new to every server in each round (both servers cache prompts). A side that
    fails under load leaves the rotation with its reason in ``failed`` (bamba's sides are not
    allowed to). Returns each side's levels."""
    measured: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    sides = dict(sides)  # the rotation's own: a failed side leaves it, not the caller's
    for c, count in counts.items():
        for stream in (True, False) if c == 1 else (True,):
            for round_index in range(args.rounds):
                batch = requests(count, args, 10_000 * c + 1000 * stream + round_index)
                # concurrency 1: every request on every side back to back
                pieces = [[r] for r in batch] if c == 1 else [batch]
                parts: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
                for turn, piece in enumerate(pieces):
                    names, first = list(sides), round_index + turn
                    for name in names[first % len(names):] + names[:first % len(names)]:
                        try:
                            parts[name].append(sides[name].measure(c, piece, stream))
                        except (RuntimeError, OSError, EOFError, TimeoutError) as exc:
                            if not isinstance(sides[name], LlamaSide):
                                raise
                            failed[name] = sides.pop(name).failure(exc)
                            print(failed[name], flush=True)
                for name in sides:
                    level = level_of(c, stream, parts[name])
                    measured[name].append(level)
                    print(json.dumps({name: level}), flush=True)
    return measured


# ---- report ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "benchmark": "bamba serve vs its offline engine vs llama-server, same client load",
        "host": in_passing_thread(lambda: describe_host(quick=args.quick)),
        "settings": {"dtype": args.dtype, "threads": args.threads,
                     "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
                     "output_spread": args.output_spread,
                     "memory_gb": args.memory_gb, "sampling": "greedy, ignore_eos",
                     "client": "separate process, raw asyncio HTTP/1.1, SSE",
                     "server_http": http_protocol(args.http), "server_loop": event_loop(args.loop),
                     "rounds": args.rounds, "load_average_at_start": os.getloadavg()}}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "ckpt"
        report["model"] = info = in_passing_thread(  # no OpenMP pool left on this main thread
            lambda: write_checkpoint(directory, args.preset))
        args.vocab = info["vocab_size"]
        counts = {c: args.requests or max(8, 4 * c) for c in args.concurrency}
        sides: dict[str, Any] = {}
        closed: dict[str, dict[str, Any]] = {}
        failed: dict[str, str] = {}
        try:
            sides["bamba"] = BambaSide(directory, args)
            sides["offline"] = OfflineSide(directory, args)
            if args.llama_cpp == "off":
                closed["llama_cpp"] = {"missing": "--llama-cpp off"}
            else:
                try:
                    sides["llama_cpp"] = LlamaSide(directory, args)
                except llama_cpp.PeerMissing as exc:
                    print(f"llama.cpp side skipped: {exc}", flush=True)
                    closed["llama_cpp"] = {"missing": str(exc)}
            measured = run_rotation(sides, counts, args, failed)
        finally:
            for name, side in sides.items():
                closed.setdefault(name, {}).update(side.close())
        for name, levels in measured.items():
            closed[name]["levels"] = best_levels(levels)
        report["ratios"] = round_ratios(measured)
        for name, why in failed.items():
            closed[name]["failed"] = why
        report.update({name: closed[name] for name in ("bamba", "offline", "llama_cpp")})
    report["settings"]["load_average_at_end"] = os.getloadavg()
    print_table(report)
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


# A level's figures kept for every round beside its best round's (``rounds_<name>``).
ROUND_FIELDS = {"output_tok_per_s": "rounds_tok_per_s", "itl_p50_ms": "rounds_itl_p50_ms",
                "itl_p99_ms": "rounds_itl_p99_ms"}


def best_levels(levels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A side's measured levels, one per (concurrency, streaming): the round with the highest
    output tok/s, with every round's tok/s and inter-token p50 / p99 beside it (``rounds_*``;
    the latencies where the level measured them)."""
    best: dict[tuple[int, bool], dict[str, Any]] = {}
    for level in levels:
        key = level["concurrency"], level["stream"]
        if key not in best or level["output_tok_per_s"] > best[key]["output_tok_per_s"]:
            best[key] = level
    rounds = {name: _rounds_by_level(levels, field) for field, name in ROUND_FIELDS.items()}
    return [{**level, **{name: seen[key] for name, seen in rounds.items() if key in seen}}
            for key, level in best.items()]


def round_ratios(measured: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per level, bamba's output tok/s over each other side's in the same round (the sides ran
    back to back in it), every round's and their median."""
    by_side = {name: _rounds_by_level(levels) for name, levels in measured.items()}
    ratios = []
    for key, ours in by_side.get("bamba", {}).items():
        level: dict[str, Any] = {"concurrency": key[0], "stream": key[1]}
        for name in ("offline", "llama_cpp"):
            theirs = by_side.get(name, {}).get(key, [])
            rounds = [round(a / b, 3) for a, b in zip(ours, theirs) if b > 0]
            if rounds:
                level[f"vs_{name}"] = {"rounds": rounds,
                                       "median": round(statistics.median(rounds), 3)}
        ratios.append(level)
    return ratios


def _rounds_by_level(levels: list[dict[str, Any]],
                     field: str = "output_tok_per_s") -> dict[tuple[int, bool], list[float]]:
    """Per (concurrency, streaming), ``field`` of every round that measured it."""
    rounds: dict[tuple[int, bool], list[float]] = {}
    for level in levels:
        if level.get(field) is not None:
            rounds.setdefault((level["concurrency"], level["stream"]), []).append(level[field])
    return rounds


def print_table(report: dict[str, Any]) -> None:
    model = report["model"]
    print(f"\nmodel {model['preset']} ({model['parameters'] / 1e6:.1f}M params), "
          f"{report['settings']['dtype']}, {report['settings']['threads']} threads")
    offline = {(lv["concurrency"], lv["stream"]): lv for lv in report["offline"]["levels"]}
    peer = {(lv["concurrency"], lv["stream"]): lv
            for lv in report["llama_cpp"].get("levels", [])}
    ratios = {(lv["concurrency"], lv["stream"]): lv for lv in report["ratios"]}
    print(f"{'conc':>4} {'stream':>6} {'tok/s':>7} {'offline':>7} {'llama':>7} "
          f"{'TTFT p50':>8} {'p99':>7} {'ITL p50':>7} {'p99':>7} {'llama ITL p50':>13} "
          f"{'median of rounds: vs offline':>28} {'vs llama':>8}")
    for lv in report["bamba"]["levels"]:
        other = peer.get((lv["concurrency"], lv["stream"]), {})
        ratio = ratios.get((lv["concurrency"], lv["stream"]), {})
        print(f"{lv['concurrency']:>4} {str(lv['stream']):>6} {lv['output_tok_per_s']:>7.1f} "
              f"{offline[lv['concurrency'], lv['stream']]['output_tok_per_s']:>7.1f} "
              f"{_cell(other.get('output_tok_per_s'), 7, '.1f')} "
              f"{_cell(lv.get('ttft_p50_s'), 8, '.3f')} {_cell(lv.get('ttft_p99_s'), 7, '.3f')} "
              f"{_cell(lv.get('itl_p50_ms'), 7, '.1f')} {_cell(lv.get('itl_p99_ms'), 7, '.1f')} "
              f"{_cell(other.get('itl_p50_ms'), 13, '.1f')} "
              f"{_cell(ratio.get('vs_offline', {}).get('median'), 28, '.3f')} "
              f"{_cell(ratio.get('vs_llama_cpp', {}).get('median'), 8, '.3f')}")
    for why in ("missing", "failed"):
        if why in report["llama_cpp"]:
            print(f"llama.cpp: {report['llama_cpp'][why]}")


def _cell(value: float | None, width: int, spec: str) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


if __name__ == "__main__":
    sys.exit(main())
