"""Training benchmark: bamba's training step vs a plain transformers training loop, in one run.

For each case (the demo model = preset "tiny", and the bench hybrid = preset "bench" at a shorter
sequence so a step fits this CPU's time), both implementations start from the SAME weights
(ours copied into transformers.BambaForCausalLM built from ``config.to_hf_dict()``), see the SAME
random token batches and take the same kind of step:
  bf16 autocast forward, next-token cross-entropy in fp32, backward, clip to 1.0, AdamW
  (lr 3e-4, betas 0.9/0.95, weight decay 0.1), zero_grad.
bamba's step is ``bamba.train.trainer.train_step`` (the trainer's own code, optimizer from
``build_optimizer``); transformers' is ``model(input_ids, labels=...).loss.backward()`` with
torch's AdamW. With --compile a third row, "bamba compiled", runs the same step on a copy of
the model compiled in place with the compiled loss (what ``TrainConfig.compile`` runs); its compile time is
spent in the warm-up steps, reported separately (``compile_seconds``) and not counted in its
tokens/s.

The trainer keeps freed memory in the process (``bamba.train.memory``, process-wide and
irreversible), and this process applies the same setting. The goal's baseline, the plain
transformers loop with glibc's default allocator ("transformers"), therefore runs in a spawned
child process of its own; beside it, "transformers, retained memory" is the same loop in this
process (what the trainer's setting gives it). All rows are timed in rotating order
(A B C D, D C B A, ...) so machine load hits all alike; the child waits on a pipe while the
others run. Each repeat times --steps steps after --warmup steps; the median over repeats is
reported, with MFU = tokens/s x training FLOPs per token / --peak-tflops (default: this
process's measured bf16 matmul peak); ``speedup`` is over
the plain loop, ``speedup_vs_retained`` over the loop with the same allocator. Writes
benchmarks/results/train.json.

    python benchmarks/bench_train.py                  # both cases
    python benchmarks/bench_train.py --compile        # plus bamba with compile: true
    python benchmarks/bench_train.py --quick          # demo shape, 1 step: a smoke test
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import tempfile
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import transformers

from bamba.config import preset
from bamba.model import BambaLM, init_weights
from bamba.native import accelerate, is_accelerated
from bamba.train.train_config import TrainConfig
from bamba.train.metrics import flops_per_token, mfu
from bamba.train.memory import retain_freed_memory
from bamba.train.optim import build_optimizer
from bamba.train.parallel import DistInfo
from bamba.train.trainer import compile_layers, train_step
sys.path.insert(0, str(Path(__file__).parent))
from host import describe_host, write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "train.json"
# case -> (preset, seq_len, batch): the demo's shape, and the bench hybrid at 256 x 2 (its
# 4K x 8 training shape would take minutes per step on 2 cores).
CASES = {"demo": ("tiny", 256, 8), "bench": ("bench", 256, 2)}
LR, BETAS, WD, CLIP = 3e-4, (0.9, 0.95), 0.1, 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="demo,bench", help=f"comma-separated of {', '.join(CASES)}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="bf16 peak of this CPU for MFU (default: measured, see host.py)")
    p.add_argument("--compile", action="store_true",
                   help="also time bamba with compile: true (compile time excluded, reported)")
    p.add_argument("--inductor-cache", default=None,
                   help="inductor cache directory for --compile (default: a fresh one, cold)")
    p.add_argument("--quick", action="store_true", help="demo case, 1 repeat of 1 step")
    p.add_argument("--output", type=Path, default=RESULTS)
    return p.parse_args(argv)


def batches(vocab: int, seq_len: int, batch: int, count: int, seed: int = 0) -> list[dict]:
    """Random token rows; labels are the next token (the last position is ignored)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (batch, seq_len + 1), generator=gen)
        out.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:].clone(), "next": ids,
                    "seq_idx": torch.zeros(batch, seq_len, dtype=torch.int32)})  # one document a row
    return out


def bamba_stepper(model: BambaLM, seq_len: int, batch: int,
                  compiled: bool = False) -> Callable[[dict], None]:
    """The trainer's step; ``compiled``: the model was compiled by ``compile_layers`` and the
    step uses the trainer's compiled loss (what ``compile: true`` runs)."""
    cfg = TrainConfig(seq_len=seq_len, batch_size=batch, lr=LR, weight_decay=WD,
                      beta1=BETAS[0], beta2=BETAS[1], grad_clip=CLIP, bf16=True, compile=compiled)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    opt = build_optimizer(model, lr=LR, weight_decay=WD, betas=BETAS)

    def step(b: dict) -> None:
        train_step(model, opt, [{k: b[k] for k in ("input_ids", "labels", "seq_idx")}], cfg, info)

    return step


def hf_stepper(model: Any) -> Callable[[dict], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD)

    def step(b: dict) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            # transformers shifts the labels itself: give it the unshifted row
            loss = model(input_ids=b["next"][:, :-1], labels=b["next"][:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def hf_config(config: Any) -> Any:
    """transformers' config from ``config.to_hf_dict()``, read as config.json is read (the dict
    spells an infinite time-step limit the way JSON files do)."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config.to_hf_dict()))
        return transformers.AutoConfig.from_pretrained(tmp)


def build_pair(name: str) -> tuple[Any, BambaLM, Any]:
    preset_name, _, _ = CASES[name]
    config = preset(preset_name)
    ours = accelerate(init_weights(BambaLM(config), seed=0)).train()  # as build_model does
    theirs = transformers.BambaForCausalLM(hf_config(config))
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    if unexpected or [m for m in missing if "rotary" not in m]:
        raise RuntimeError(f"weights do not map: missing {missing}, unexpected {unexpected}")
    return config, ours, theirs.train()


def time_steps(step: Callable[[dict], None], data: list[dict], steps: int) -> float:
    began = time.perf_counter()
    for i in range(steps):
        step(data[i % len(data)])
    return time.perf_counter() - began


PLAIN = "transformers"  # the goal's baseline: a plain loop, glibc's default allocator
RETAINED = "transformers, retained memory"  # the same loop with the trainer's allocator setting

Timer = Callable[[int], float]  # steps -> seconds


def local_timers(name: str, compiled: bool,
                 count: int) -> tuple[Any, BambaLM, dict[str, Timer]]:
    """The implementations run in this process, all from the same initial weights, timed on
    the same ``count`` seeded batches as the child's plain loop."""
    _, seq_len, batch = CASES[name]
    config, ours, theirs = build_pair(name)
    data = batches(config.vocab_size, seq_len, batch, count)
    steppers = {"bamba": bamba_stepper(ours, seq_len, batch), RETAINED: hf_stepper(theirs)}
    if compiled:
        twin = copy.deepcopy(ours)
        compile_layers(twin)  # what build_model does for TrainConfig.compile
        steppers["bamba compiled"] = bamba_stepper(twin, seq_len, batch, compiled=True)
    timers = {k: functools.partial(time_steps, step, data) for k, step in steppers.items()}
    return config, ours, timers


def _serve_plain_loop(conn: Any, name: str, threads: int, count: int) -> None:
    """Child process: the plain transformers loop, timing ``n`` steps per request (None ends)."""
    try:
        torch.set_num_threads(threads)
        config, _, theirs = build_pair(name)
        _, seq_len, batch = CASES[name]
        step, data = hf_stepper(theirs), batches(config.vocab_size, seq_len, batch, count)
        conn.send("ready")
        while (steps := conn.recv()) is not None:
            conn.send(time_steps(step, data, steps))
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(f"error: {type(e).__name__}: {e}")


class PlainLoop:
    """The plain transformers loop in a fresh process of its own (spawned: glibc's default
    allocator whatever this process set), timed on request so that it takes its turn in the
    rotation like the rows run here. Same seeded weights and batches as the parent's."""

    def __init__(self, name: str, threads: int, count: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve_plain_loop, args=(child, name, threads, count),
                                daemon=True)
        self.proc.start()
        child.close()
        self._reply()

    def _reply(self) -> Any:
        got = self.conn.recv()
        if isinstance(got, str) and got.startswith("error:"):
            raise RuntimeError(f"plain transformers loop: {got[7:]}")
        return got

    def __call__(self, steps: int) -> float:
        self.conn.send(steps)
        return self._reply()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(timeout=60)


class Case:
    """One case's implementations, warm-up times and speed samples."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name, self.args = name, args
        _, self.seq_len, self.batch = CASES[name]
        count = max(args.steps, args.warmup)
        self.plain = PlainLoop(name, args.threads, count)
        self.config, self.ours, local = local_timers(name, args.compile, count)
        self.timers: dict[str, Timer] = {"bamba": local.pop("bamba"), PLAIN: self.plain, **local}
        self.warmup: dict[str, float] = {}
        self.speeds: dict[str, list[float]] = {k: [] for k in self.timers}

    def measure(self) -> None:
        """Warm every implementation up, then time them in rotating order (A B C D, D C B A,
        ...) so machine load hits all alike."""
        args, impls = self.args, list(self.timers)
        for impl in impls:
            self.warmup[impl] = self.timers[impl](args.warmup)
        tokens = args.steps * self.seq_len * self.batch
        for r in range(args.repeats):
            for impl in impls if r % 2 == 0 else list(reversed(impls)):
                self.speeds[impl].append(tokens / self.timers[impl](args.steps))
            print(f"{self.name} repeat {r}: " + ", ".join(
                f"{k} {self.speeds[k][-1]:.0f} tok/s" for k in impls), flush=True)
        self.plain.close()

    def result(self) -> dict[str, Any]:
        args, flops = self.args, flops_per_token(self.config, self.seq_len)
        out: dict[str, Any] = {"preset": CASES[self.name][0], "seq_len": self.seq_len,
                               "batch_size": self.batch,
                               "parameters": sum(p.numel() for p in self.ours.parameters()),
                               "train_flops_per_token": flops}
        plain, retained = (statistics.median(self.speeds[k]) for k in (PLAIN, RETAINED))
        for impl, values in self.speeds.items():
            med = statistics.median(values)
            out[impl] = {"tokens_per_s": med, "mfu": mfu(med, flops, args.peak_tflops),
                         "samples": values, "warmup_seconds": self.warmup[impl],
                         "speedup": med / plain, "speedup_vs_retained": med / retained}
            if impl == "bamba compiled":  # warm-up time beyond what its steps take once compiled
                out[impl]["compile_seconds"] = (self.warmup[impl] - args.warmup * self.seq_len
                                                * self.batch / med)
        out[PLAIN]["process"] = "a spawned child process with glibc's default allocator"
        out["speedup"] = out["bamba"]["speedup"]
        return out


def run_cases(names: list[str], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``retain_freed_memory()`` (what ``bamba train`` applies) in this process, then each case
    in rotation, the plain loop in a child process of its own."""
    applied = retain_freed_memory()
    results = {}
    for name in names:
        case = Case(name, args)
        case.measure()
        results[name] = case.result()
        results[name]["retained_memory_applied"] = applied
        del case
    return results


def inductor_cache(compiled: bool, directory: str | None) -> tuple[str | None, str | None]:
    """Compile from a cold cache (a fresh temporary directory, what a first run sees) unless
    --inductor-cache names one. Returns how compile_seconds was measured and the directory to
    remove afterwards (None: nothing made)."""
    if not compiled:
        return None, None
    if directory:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = directory
        return f"{directory} (may be warm)", None
    made = tempfile.mkdtemp(prefix="bench_train_inductor_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = made
    return "cold: a fresh temporary directory", made


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.cases, args.repeats, args.steps, args.warmup = "demo", 1, 1, 1
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    for n in names:
        if n not in CASES:
            raise SystemExit(f"unknown case {n!r}; known: {', '.join(CASES)}")
    torch.set_num_threads(args.threads)
    host = describe_host(quick=args.quick)
    peak_source = "given (--peak-tflops)"
    if args.peak_tflops is None:
        args.peak_tflops = host["bf16_matmul_tflops"]
        peak_source = "measured: best bf16 matmul in this process (host.bf16_matmul_tflops)"
    cache, made = inductor_cache(args.compile, args.inductor_cache)
    load_before = os.getloadavg()
    try:
        results = run_cases(names, args)
    finally:
        if made:
            shutil.rmtree(made, ignore_errors=True)
    report = {"benchmark": "training step tokens/s, bamba vs transformers (same weights, data, "
                           "optimizer, bf16 autocast)",
              "cases": results, "threads": args.threads, "repeats": args.repeats,
              "steps_per_repeat": args.steps, "warmup_steps": args.warmup,
              "compile_note": "bamba compiled = the same train_step on a copy of the model after "
                              "compile_layers (TrainConfig.compile: each decoder layer compiled in place); compilation happens in its "
                              "warm-up steps: compile_seconds = warm-up time minus its steps at "
                              "the measured speed; tokens/s excludes it" if args.compile else None,
              "inductor_cache": cache,
              "peak_tflops": args.peak_tflops, "peak_source": peak_source, "host": host,
              "dtype": "bf16 autocast, fp32 weights/optimizer",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "load_average_before": load_before, "load_average_after": os.getloadavg()}
    write_json(args.output, report)
    for n, r in results.items():
        line = (f"{n:6s} {r['preset']:6s} {r['batch_size']}x{r['seq_len']}: bamba "
                f"{r['bamba']['tokens_per_s']:.0f} tok/s (MFU {r['bamba']['mfu']:.1%}), transformers "
                f"{r[PLAIN]['tokens_per_s']:.0f} tok/s -> {r['speedup']:.2f}x (retained memory: "
                f"{r[RETAINED]['tokens_per_s']:.0f} tok/s -> {r['bamba']['speedup_vs_retained']:.2f}x)")
        if "bamba compiled" in r:
            c = r["bamba compiled"]
            line += (f"; compiled {c['tokens_per_s']:.0f} tok/s (MFU {c['mfu']:.1%}, compile "
                     f"{c['compile_seconds']:.0f} s) -> {c['speedup']:.2f}x / "
                     f"{c['speedup_vs_retained']:.2f}x")
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
