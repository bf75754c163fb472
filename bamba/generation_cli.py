"""``bamba generate``: continue a prompt, streaming the text, then report prefill/decode speed."""

from __future__ import annotations

import argparse
import sys
from typing import Any

DTYPES = ("float32", "bfloat16")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="DIR_OR_ID",
                        help="checkpoint directory or hub id (default: the tiny model `bamba demo` "
                             "trained, else an untrained tiny model whose text is noise)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1 = off")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--dtype", default="float32", help=f"one of {', '.join(DTYPES)}")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch threads (default: torch's choice)")
    parser.add_argument("--compile", default="none", metavar="MODE",
                        help="compile the decode step with inductor: default or max-autotune "
                             "(a minute or more before the first token; faster decode after)")


def _dtype(name: str) -> Any:
    import torch

    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def _load(model_ref: str | None, dtype: Any) -> tuple[Any, Any, bool]:
    """(model, tokenizer, is_embedded_default)."""
    if model_ref is None:
        from bamba.default_model import load_default

        return *load_default(dtype), True
    from bamba.checkpoint import from_pretrained, load_tokenizer

    tokenizer = load_tokenizer(model_ref)  # first: a missing tokenizer fails before the weights
    return from_pretrained(model_ref, dtype=dtype), tokenizer, False


def run(args: argparse.Namespace) -> int:
    import torch

    from bamba.engine.detok import IncrementalDetokenizer
    from bamba.generation import GenerationConfig, GenerationStream

    if not args.prompt:
        raise ValueError("--prompt is empty")
    dtype = _dtype(args.dtype)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    GenerationConfig(**options)  # bad values fail before the model loads
    if args.compile != "none":
        from bamba.compile import inductor_options

        inductor_options(args.compile)
    model, tokenizer, embedded = _load(args.model, dtype)
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise ValueError("--prompt encodes to no tokens")
    eos = sorted(set(model.config.eos_token_ids) | set(tokenizer.eos_token_ids))
    config = GenerationConfig(**options, eos_token_ids=eos)
    decode_step = _compiled_step(model, args.compile, len(prompt) + args.max_new_tokens)
    stream = GenerationStream(model, prompt, config, decode_step)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    for token in stream:
        sys.stdout.write(detok.add(token))
        sys.stdout.flush()
    sys.stdout.write(detok.flush() + "\n")
    sys.stdout.flush()
    print(_report(stream.result, args.dtype, torch.get_num_threads(), embedded), file=sys.stderr)
    return 0


def _compiled_step(model: Any, mode: str, cache_len: int) -> Any:
    """None for ``--compile none``; else a compiled decode step, compiled now (outside the
    timed decode) for this run's cache shape."""
    if mode == "none":
        return None
    import torch

    from bamba.cache import ContiguousCache
    from bamba.compile import CompiledDecode

    step = CompiledDecode(model, mode)
    cache = ContiguousCache(model.config, 1, cache_len, model.dtype, device=model.device)
    zeros = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    with torch.inference_mode():
        step(zeros, zeros, cache)
    print(f"compiled the decode step ({mode}) in {step.compile_seconds:.0f} s", file=sys.stderr)
    return step


def _report(result: Any, dtype: str, threads: int, embedded: bool) -> str:
    line = (f"prefill: {result.prompt_tokens} tokens, {result.prefill_tokens_per_second:.1f} tok/s"
            f" | decode: {result.decode_steps} tokens, {result.decode_tokens_per_second:.1f} tok/s"
            f" | {dtype}, {threads} threads, finish: {result.finish_reason}")
    from bamba.default_model import NOTICE, trained_default

    if embedded and trained_default() is None:
        line += f"\nnote: {NOTICE}"
    return line
