"""Prompt-lookup decoding: what a pass of drafts costs, and what it gains on real text.

Two parts, one run, bf16, greedy:

- pass cost, on the bench shape (random weights: cost does not depend on them): after a
  --context-token prefill, one pass of L = 1 .. 9 tokens from the same states (restored each
  time), as rows of one native step and as a forward pass (``sequence_pass``), as a multiple
  of a plain decode step. A pass with k drafts costs this at L = k + 1 (more with tokens
  pending) and decides between 1 (all rejected) and k + 1 tokens.
- whole continuations of held-out Python (the stdlib's tests, which the demo does not train
  on) with a trained model (--model, default: the tiny model ``bamba demo`` trains, trained
  here when absent): "recite", a passage and then its first line again (the model may repeat
  the passage), and "continue", the passage alone; plain decoding against --lookups draft
  lengths. Reported: decode tok/s, drafts taken, and whether the tokens are plain decoding's.
  Kinds alternate round by round; the median round is kept. Then the same through the
  engine (``LLM`` with ``speculative_config``), 1, 2 and 4 requests at once (users of a
  server): their tok/s together.

Writes benchmarks/results/lookup.json with the host's measured matmul peak and read bandwidth.

    python benchmarks/bench_lookup.py            # ~5 min on 2 cores (+ ~10 to train the demo)
    python benchmarks/bench_lookup.py --quick    # tiny shapes, seconds: smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bamba.cache import ContiguousCache
from bamba.checkpoint import from_pretrained
from bamba.config import preset
from bamba.generation import GenerationConfig, generate, sequence_pass
from bamba.model import BambaLM, init_weights
from bamba.native import accelerate, steady_weights
from bamba.tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from bench_quant import held_out_files  # noqa: E402
from host import describe_host, write_json  # noqa: E402
from measure import bamba_cli  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None,
                   help="a trained checkpoint with its tokenizer (default: the demo's)")
    p.add_argument("--lookups", type=int, nargs="+", default=[2, 4, 7],
                   help="draft lengths compared with plain decoding")
    p.add_argument("--tokens", type=int, default=128, help="tokens a continuation")
    p.add_argument("--files", type=int, default=4, help="held-out files (a passage each)")
    p.add_argument("--passage-chars", type=int, default=1200)
    p.add_argument("--context", type=int, default=512, help="prefill before the timed passes")
    p.add_argument("--concurrent", type=int, nargs="+", default=[1, 2, 4],
                   help="requests the engine runs at once")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="the trained model's weights (float32: tokens exactly plain decoding's)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few tokens: smoke test")
    p.add_argument("--output", type=Path, default=RESULTS / "lookup.json")
    return p.parse_args(argv)


# ---- pass cost ---------------------------------------------------------------------------------
@torch.inference_mode()
def pass_costs(shape: str, context: int, repeats: int) -> dict[str, Any]:
    """Median ms of one pass of L tokens after ``context`` tokens, L = 1 .. 9, as rows of one
    native step and as a forward pass (``bamba.generation.sequence_pass``)."""
    torch.manual_seed(0)
    model = accelerate(init_weights(BambaLM(preset(shape))).to(torch.bfloat16).eval())
    vocab = model.config.vocab_size
    cache = ContiguousCache(model.config, 1, context + 16, model.dtype)
    with steady_weights():
        model(torch.randint(vocab, (1, context)), cache=cache.bind([0]), logits_to_keep=1)
        cache.checkpoint_states(0)
        ms: dict[str, dict[int, float]] = {"rows": {}, "forward": {}}
        for length in range(1, 10):
            tokens = torch.randint(vocab, (length,)).tolist()
            for way, times in ms.items():
                runs = []
                for _ in range(repeats + 1):  # the first warms up
                    cache.restore_states(0)
                    start = time.perf_counter()
                    sequence_pass(model, cache, 0, tokens, context, length, way == "rows")
                    runs.append(time.perf_counter() - start)
                times[length] = statistics.median(runs[1:]) * 1e3
    step = ms["rows"][1]  # one token: the decode step
    return {"shape": shape, "context": context, "decode_step_ms": round(step, 2),
            "passes": [{"tokens": n, **{f"{way}_ms": round(ms[way][n], 2) for way in ms},
                        **{f"{way}_over_decode_step": round(ms[way][n] / step, 3)
                           for way in ms}} for n in ms["rows"]]}


# ---- continuations -----------------------------------------------------------------------------
def demo_checkpoint(work: Path) -> Path:
    """The checkpoint ``bamba demo`` trained (``bamba.default_model``), else one trained now."""
    from bamba.default_model import trained_default

    found = trained_default()
    if found is not None:
        return found
    from bamba.demo import trained_checkpoint

    bamba_cli("demo", "--dir", str(work / "demo"), "--prompt", "import os")
    return trained_checkpoint(work / "demo")


def prompts(tokenizer: Any, files: int, chars: int) -> dict[str, list[list[int]]]:
    """Per kind, one prompt per held-out file: its passage (``continue``), or the passage and
    its first line again (``recite``)."""
    made: dict[str, list[list[int]]] = {"recite": [], "continue": []}
    for path in held_out_files()[:files]:
        text = path.read_text(encoding="utf-8", errors="replace")
        body = text[text.find("\nimport"):][:chars].strip() or text[:chars]  # past the headers
        first_line = body.split("\n", 1)[0]
        made["continue"].append(tokenizer.encode(body + "\n"))
        made["recite"].append(tokenizer.encode(body + "\n\n" + first_line + "\n"))
    return made


def continuation(model: BambaLM, prompt: list[int], tokens: int, lookup: int) -> Any:
    config = GenerationConfig(max_new_tokens=tokens, ignore_eos=True,
                              prompt_lookup_tokens=lookup)
    return generate(model, [prompt], config)[0]


def continuations(model: BambaLM, directory: Path, args: argparse.Namespace
                  ) -> list[dict[str, Any]]:
    kinds = prompts(load_tokenizer(directory), args.files, args.passage_chars)
    lookups = [0, *args.lookups]
    rows = []
    for kind, batch in kinds.items():
        for prompt in batch[:1]:  # warm-up: kernels, caches
            for k in lookups:
                continuation(model, prompt, min(args.tokens, 8), k)
        rounds: dict[int, list[float]] = {k: [] for k in lookups}
        drafts = {k: [0, 0] for k in lookups}
        agree: dict[int, list[float]] = {k: [] for k in lookups}
        for _ in range(args.rounds):
            plain_tokens = []
            for k in lookups:
                seconds = decoded = 0
                for i, prompt in enumerate(batch):
                    result = continuation(model, prompt, args.tokens, k)
                    seconds += result.decode_seconds
                    decoded += result.decode_steps
                    drafts[k][0] += result.accepted_draft_tokens
                    drafts[k][1] += result.draft_tokens
                    if k == 0:
                        plain_tokens.append(result.token_ids)
                    agree[k].append(common_prefix(result.token_ids, plain_tokens[i]) /
                                    len(plain_tokens[i]))
                rounds[k].append(decoded / seconds)
        plain = statistics.median(rounds[0])
        for k in lookups:
            tok_s = statistics.median(rounds[k])
            taken, drafted = drafts[k]
            rows.append({"kind": kind, "prompt_lookup_tokens": k, "tok_s": round(tok_s, 1),
                         "over_plain": round(tok_s / plain, 3),
                         "drafts_taken": round(taken / drafted, 3) if drafted else None,
                         "as_plain_until_first_difference": round(statistics.mean(agree[k]), 3)})
            print(f"{kind:8s} k={k}  {tok_s:7.1f} tok/s  {tok_s / plain:.2f}x plain  drafts "
                  f"taken {taken}/{drafted}  tokens as plain decoding's before the first "
                  f"difference: {statistics.mean(agree[k]):.0%}")
    return rows


def engine_continuations(directory: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The same greedy continuations through the engine (``LLM``, as users of ``bamba serve``:
    --concurrent requests at once), plain against ``speculative_config``: decode tok/s of
    all the requests together (from the step that gave each its first token to the last), the
    drafts taken, and the tokens against plain's."""
    from bamba.engine import LLM, SamplingParams

    lookups = [0, *args.lookups]
    engines = {k: LLM(str(directory), dtype=args.dtype, memory_gb=0.5,
                      max_num_seqs=max(args.concurrent), enable_prefix_caching=False,
                      speculative_config=None if k == 0 else
                      {"method": "ngram", "num_speculative_tokens": k}) for k in lookups}
    kinds = prompts(engines[0].tokenizer, args.files, args.passage_chars)
    whole = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)

    def decode(llm: Any, batch: list[list[int]]) -> tuple[float, list[list[int]]]:
        ids = [llm.add_request(prompt, whole) for prompt in batch]
        outs: dict[str, Any] = {}
        start = None
        while llm.has_unfinished_requests():
            outs.update((out.request_id, out) for out in llm.step())
            if start is None and len(outs) == len(ids):  # every request has its first token
                start = time.perf_counter()
        return time.perf_counter() - start, [outs[i].outputs[0].token_ids for i in ids]

    rows = []
    for concurrent in args.concurrent:
        for kind, batch in kinds.items():
            groups = [batch[i:i + concurrent] for i in range(0, len(batch), concurrent)]
            for k in lookups:  # warm-up
                decode(engines[k], groups[0])
            counted = {k: engines[k].stats() for k in lookups}
            rounds: dict[int, list[float]] = {k: [] for k in lookups}
            agree: dict[int, list[float]] = {k: [] for k in lookups}
            for _ in range(args.rounds):
                plain: list[list[int]] = []
                for k in lookups:
                    seconds, outs = 0.0, []
                    for group in groups:
                        elapsed, tokens = decode(engines[k], group)
                        seconds += elapsed
                        outs += tokens
                    if k == 0:
                        plain = outs
                    agree[k] += [common_prefix(a, b) / len(b) for a, b in zip(outs, plain)]
                    rounds[k].append((args.tokens - 1) * len(batch) / seconds)
            base = statistics.median(rounds[0])
            for k in lookups:
                tok_s = statistics.median(rounds[k])
                stats, before = engines[k].stats(), counted[k]
                drafted = stats.num_draft_tokens - before.num_draft_tokens
                taken = (stats.num_accepted_draft_tokens - before.num_accepted_draft_tokens) \
                    / drafted if drafted else None
                rows.append({"kind": kind, "concurrent": concurrent,
                             "num_speculative_tokens": k, "tok_s": round(tok_s, 1),
                             "over_plain": round(tok_s / base, 3),
                             "drafts_taken": None if taken is None else round(taken, 3),
                             "as_plain_until_first_difference":
                                 round(statistics.mean(agree[k]), 3)})
                print(f"engine {concurrent} at once {kind:8s} k={k}  {tok_s:7.1f} tok/s  "
                      f"{tok_s / base:.2f}x plain  drafts taken: "
                      f"{'-' if taken is None else f'{taken:.0%}'}  "
                      f"tokens as plain's: {statistics.mean(agree[k]):.0%}")
    return rows


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.tokens, args.files, args.rounds, args.lookups = 12, 2, 1, [3]
        args.concurrent = [1, 2]
        args.context, args.passage_chars = 64, 300
    torch.set_num_threads(args.threads)
    costs = pass_costs("tiny" if args.quick else "bench", args.context,
                       3 if args.quick else 20)
    for row in costs["passes"]:
        print(f"pass of {row['tokens']} tokens: as rows {row['rows_ms']:7.2f} ms "
              f"({row['rows_over_decode_step']:.2f}x a decode step), as a forward pass "
              f"{row['forward_ms']:7.2f} ms ({row['forward_over_decode_step']:.2f}x)")
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.model or demo_checkpoint(Path(tmp))
        model = from_pretrained(directory, dtype=getattr(torch, args.dtype))
        rows = continuations(model, directory, args)
        engine_rows = engine_continuations(directory, args)
    config = model.config
    result = {"host": describe_host(quick=args.quick), "pass_cost": costs,
              "model": str(args.model or "the demo's trained checkpoint"),
              "model_shape": {"hidden_size": config.hidden_size,
                              "layers": config.num_hidden_layers,
                              "vocab_size": config.vocab_size},
              "dtype": args.dtype, "tokens": args.tokens, "files": args.files,
              "rounds": args.rounds,
              "continuations": rows, "engine_continuations": engine_rows}
    write_json(args.output, result)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
