"""``bamba eval phonebook``: PhoneBook retrieval accuracy per prompt length, through the engine,
for the checkpoint's RoPE and any ``--rope-scaling`` overrides (one line each in the plot)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from bamba.cli.eval import (add_model_arguments, check_context,
                            checkpoint_config, load_model, load_tokenizer, parse_rope_scaling,
                            prepare, short_name, write_results)

BLOCK_SIZE = 16


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096],
                        metavar="TOKENS", help="prompt lengths in tokens, one phone book size each")
    parser.add_argument("--samples", type=int, default=20, metavar="N",
                        help="phone books (queries) per length")
    parser.add_argument("--max-new-tokens", type=int, default=20, metavar="N",
                        help="tokens generated per answer at most (greedy, stopped at a newline)")
    parser.add_argument("--rope-scaling", action="append", default=None, metavar="JSON",
                        help="a RoPE scaling over the checkpoint's, e.g. "
                             "'{\"rope_type\": \"yarn\", \"factor\": 4}'; repeat to compare "
                             "several, 'none' for the checkpoint's own (default: its own only)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the phone books (names, numbers, query)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N",
                        help="prompts the engine runs at once (its memory is sized for them)")
    parser.add_argument("--examples", type=int, default=3, metavar="N",
                        help="answers per length shown in the JSON")


def _check_counts(args: argparse.Namespace) -> list[int]:
    for name in ("samples", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.examples < 0:
        raise ValueError(f"--examples must be >= 0, got {args.examples}")
    bad = [n for n in args.lengths if n < 1]
    if bad:
        raise ValueError(f"--lengths must be positive token counts, got {bad[0]}")
    return list(dict.fromkeys(args.lengths))


def build_engine(model: Any, tokenizer: Any, max_num_seqs: int, max_len: int) -> Any:
    """An engine whose memory holds ``max_num_seqs`` sequences of ``max_len`` tokens."""
    import torch

    from bamba.engine import LLM
    from bamba.engine.page_pool import kv_bytes_per_block, state_bytes_per_slot

    block_bytes = kv_bytes_per_block(model.config, BLOCK_SIZE, model.dtype)
    states = max_num_seqs * state_bytes_per_slot(model.config, model.dtype, torch.float32)
    kv = max_num_seqs * math.ceil(max_len / BLOCK_SIZE) * block_bytes
    budget = max(kv + states, 2 * states) + block_bytes + 1  # + rounding of the GB figure
    llm = LLM(model, tokenizer, memory_gb=budget / 1e9, block_size=BLOCK_SIZE,
              max_num_seqs=max_num_seqs, enable_prefix_caching=False, max_model_len=max_len)
    assert llm.max_model_len >= max_len, (llm.max_model_len, max_len)
    return llm


def _label(scaling: dict[str, Any] | None) -> str:
    return "checkpoint RoPE" if scaling is None else json.dumps(scaling, sort_keys=True)


def run(args: argparse.Namespace) -> int:
    from bamba.eval.phonebook import engine_completer, evaluate, make_samples
    from bamba.eval.plots import line_plot

    lengths = _check_counts(args)
    scalings = [parse_rope_scaling(t) for t in args.rope_scaling or ["none"]]
    prepare(args)
    needed = max(lengths) + args.max_new_tokens
    what = f"--lengths {max(lengths)} plus --max-new-tokens {args.max_new_tokens}"
    if None in scalings:
        check_context(needed, checkpoint_config(args.model).context_length, what, False)
    tokenizer = load_tokenizer(args)
    books = {n: make_samples(n, args.samples, tokenizer.encode, args.seed) for n in lengths}
    runs = []
    for scaling in scalings:
        model = load_model(args, scaling)
        check_context(needed, model.config.context_length, what, scaling is not None)
        llm = build_engine(model, tokenizer, args.batch_size, needed)
        results = evaluate(books, engine_completer(llm, args.max_new_tokens), args.examples)
        runs.append({"rope_scaling": scaling, "label": _label(scaling), "lengths": results})
        for r in results:
            print(f"{_label(scaling)} | {r['length']} tokens: accuracy {r['accuracy']:.3f} "
                  f"({r['correct']}/{r['n']}), {r['mean_prompt_tokens']:.0f} prompt tokens")
        del llm, model
    result = {"task": "phonebook", "model": args.model, "dtype": args.dtype, "seed": args.seed,
              "samples": args.samples, "max_new_tokens": args.max_new_tokens, "runs": runs}
    path = write_results(args.out, "phonebook", result)
    line_plot(path.with_suffix(".png"),
              [(r["label"], [x["length"] for x in r["lengths"]],
                [x["accuracy"] for x in r["lengths"]]) for r in runs],
              xlabel="prompt length (tokens)", ylabel="accuracy (exact number)",
              title=f"PhoneBook: {short_name(args.model)}", log2_x=True, ylim=(-0.02, 1.02))
    print(f"wrote {path} and {path.with_suffix('.png').name}", file=sys.stderr)
    return 0
