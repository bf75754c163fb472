"""Structured outputs: what the grammar's mask costs a decode step, and a constraint's compile.

The bench preset (random weights, seeded, bf16) with a byte-level BPE tokenizer of its 32000
tokens trained on the stdlib's .py files (or --model DIR, a checkpoint with its tokenizer),
``LLM.generate`` greedy with EOS ignored, --tokens tokens a request, at n=1 and n=8: plain,
a regex, a JSON schema; the kinds alternate round by round and the median round is
kept. Writes benchmarks/results/structured.json with the host's measured matmul peak and read
bandwidth.

    python benchmarks/bench_structured.py            # ~1 min on 2 cores
    python benchmarks/bench_structured.py --quick    # the tiny preset, seconds: smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bamba.engine import LLM, SamplingParams, StructuredOutputsParams

sys.path.insert(0, str(Path(__file__).parent))
from host import describe_host, write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SCHEMA = {"type": "object", "required": ["name", "tags", "size"],
          "properties": {"name": {"type": "string"}, "size": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string"}}}}
KINDS = {"plain": None,
         "regex": StructuredOutputsParams(regex=r"[a-z ]+"),
         "json_schema": StructuredOutputsParams(json=SCHEMA)}
PROMPT = "def main():"
PROMPT_ROOM = 64  # context beyond the generated tokens: the prompt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint with a tokenizer (default: the "
                   "bench preset, random weights, a 32000-token BPE of the stdlib)")
    p.add_argument("--tokens", type=int, default=128, help="tokens a request")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny preset, few tokens: smoke test")
    p.add_argument("--output", type=Path, default=RESULTS / "structured.json")
    return p.parse_args(argv)


def build_model(directory: Path, preset_name: str, files: int | None) -> Path:
    """A seeded random model of ``preset_name`` and a BPE of its vocabulary on the stdlib."""
    from bamba.checkpoint import save_pretrained
    from bamba.config import preset
    from bamba.data.bpe import train_bpe
    from bamba.demo import corpus_files
    from bamba.model import BambaLM, init_weights
    from bamba.tokenizer import load_tokenizer

    config = preset(preset_name)
    train_bpe(corpus_files(max_files=files), config.vocab_size, directory)
    tokenizer = load_tokenizer(directory)
    config = config.replace(eos_token_id=tokenizer.eos_token_id,
                            bos_token_id=tokenizer.bos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = BambaLM(config)
    init_weights(model)
    save_pretrained(model.to(torch.bfloat16), directory, tokenizer=tokenizer)
    return directory


def seconds_per_token(llm: LLM, structured: StructuredOutputsParams | None, n: int,
                      tokens: int) -> float:
    params = SamplingParams(n=n, temperature=0, max_tokens=tokens, ignore_eos=True,
                            structured_outputs=structured)
    start = time.perf_counter()
    (out,) = llm.generate(PROMPT, params)
    elapsed = time.perf_counter() - start
    made = [len(o.token_ids) for o in out.outputs]
    if min(made) < tokens:
        raise RuntimeError(f"a request ended after {min(made)} of {tokens} tokens")
    return elapsed / tokens


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tokens = 8 if args.quick else args.tokens
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_model(Path(tmp) / "model", "tiny" if args.quick else
                                          "bench", 20 if args.quick else None)
        llm = LLM(str(model), dtype="bfloat16", memory_gb=0.5, max_num_seqs=8,
                  max_model_len=PROMPT_ROOM + tokens)
        start = time.perf_counter()  # the first constraint builds the tokenizer's tables
        llm.compile_structured_outputs(SamplingParams(
            structured_outputs=StructuredOutputsParams(regex="a")))
        compile_s = {"first_constraint": time.perf_counter() - start}
        for name, structured in KINDS.items():
            start = time.perf_counter()
            llm.compile_structured_outputs(SamplingParams(structured_outputs=structured))
            compile_s[name] = time.perf_counter() - start
        rows = []
        for n in (1, 8):
            for name in KINDS:  # warm-up: kernels, caches
                seconds_per_token(llm, KINDS[name], n, min(tokens, 8))
            rounds: dict[str, list[float]] = {name: [] for name in KINDS}
            for _ in range(args.rounds):
                for name, structured in KINDS.items():
                    rounds[name].append(seconds_per_token(llm, structured, n, tokens))
            plain = statistics.median(rounds["plain"])
            for name, times in rounds.items():
                step = statistics.median(times)
                rows.append({"n": n, "kind": name, "tok_s": round(n / step, 1),
                             "step_ms": round(step * 1e3, 2),
                             "over_plain": round(step / plain, 3)})
                print(f"n={n} {name:12s} {n / step:7.1f} tok/s  step {step * 1e3:6.2f} ms  "
                      f"{step / plain:.3f}x plain")
        result = {"host": describe_host(quick=args.quick), "model": str(args.model or
                                                                          "bench preset"),
                  "vocab_size": llm.config.vocab_size, "tokens": tokens,
                  "rounds": args.rounds, "compile_seconds": {k: round(v, 4) for k, v in
                                                             compile_s.items()},
                  "schema": SCHEMA, "rows": rows}
    write_json(args.output, result)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
