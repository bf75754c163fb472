"""``bamba generate``: continue a prompt, streaming the text, then report prefill/decode speed."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bamba.cli.inference_options import (add_model_options, add_sampling_options, load_model,
                                         rope_scaling_option, sampling_values, set_threads)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="DIR_OR_ID",
                        help="checkpoint directory, hub id or GGUF file (default: the tiny "
                             "model `bamba demo` "
                             "trained, else an untrained tiny model whose text is noise)")
    parser.add_argument("--prompt", default=None, metavar="TEXT",
                        help="text to continue; - reads it from stdin")
    parser.add_argument("--prompt-file", default=None, metavar="PATH",
                        help="read the text to continue from this UTF-8 file")
    add_sampling_options(parser, max_new_tokens=64, temperature=0.0)
    parser.add_argument("--json-schema", default=None, metavar="JSON_OR_PATH",
                        help="hold the output to this JSON schema (inline JSON or a file)")
    parser.add_argument("--regex", default=None, metavar="REGEX",
                        help="hold the output to this regular expression")
    parser.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                        help="prompt-lookup decoding: draft N tokens a step from the text's own "
                             "n-grams and check them in one pass (same output, faster on text "
                             "that repeats the prompt or itself; default 0: off)")
    parser.add_argument("--prompt-lookup-min", type=int, default=1, metavar="N",
                        help="shortest n-gram a draft may follow (default 1)")
    parser.add_argument("--prompt-lookup-max", type=int, default=3, metavar="N",
                        help="longest n-gram tried first (default 3)")
    add_model_options(parser)
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch threads (default: one per core, fewer on busy cores)")
    parser.add_argument("--compile", default="none", metavar="MODE",
                        help="compile the decode step with inductor: default or max-autotune "
                             "(about 100 s before the first token; faster decode after)")


def read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    """The prompt text from exactly one source: --prompt TEXT, --prompt - (stdin), --prompt-file."""
    if prompt is not None and prompt_file is not None:
        raise ValueError("give --prompt or --prompt-file, not both")
    if prompt is None and prompt_file is None:
        raise ValueError("no prompt: give --prompt TEXT, --prompt - (stdin) or --prompt-file PATH")
    if prompt_file is not None:
        try:
            with open(prompt_file, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:
            raise ValueError(f"--prompt-file {prompt_file}: not UTF-8 text") from None
        except IsADirectoryError:
            raise ValueError(f"--prompt-file {prompt_file}: is a directory") from None
        source = f"--prompt-file {prompt_file}"
    elif prompt == "-":
        text, source = sys.stdin.read(), "the prompt from stdin"
    else:
        text, source = prompt, "--prompt"
    if not text:
        raise ValueError(f"{source} is empty")
    return text


def structured_option(json_schema: str | None, regex: str | None) -> Any:
    """--json-schema (inline JSON or a file holding it) or --regex as structured outputs."""
    if json_schema is None and regex is None:
        return None
    if json_schema is not None and regex is not None:
        raise ValueError("give --json-schema or --regex, not both")
    from bamba.engine.structured import StructuredOutputsParams

    if regex is not None:
        return StructuredOutputsParams(regex=regex)
    path = Path(json_schema)
    text = path.read_text(encoding="utf-8") if path.is_file() else json_schema
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--json-schema: neither a file nor valid JSON ({exc.msg} at column "
                         f"{exc.colno})") from None
    if not isinstance(schema, dict):
        raise ValueError("--json-schema: a schema is a JSON object")
    return StructuredOutputsParams(json=schema)


class StopText:
    """Stop strings over streamed text: ``feed`` returns the text safe to show (text that could
    begin a stop string is held back) and whether a stop string ended the output; the stop
    string itself is never shown (OpenAI/vLLM semantics)."""

    def __init__(self, stops: list[str] | None):
        self.stops = [s for s in stops or [] if s]
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.shown = 0
        self.stopped: str | None = None

    def feed(self, new: str) -> str:
        from bamba.engine.detok import find_stop

        if self.stopped is not None:
            return ""
        start = len(self.text)
        self.text += new
        hit = find_stop(self.text, self.stops, start) if self.stops and new else None
        end = max(len(self.text) - self.holdback, self.shown)
        if hit is not None:
            end, self.stopped = hit
        out = self.text[self.shown:end]
        self.shown = end
        return out

    def rest(self) -> str:
        """At the end of the output: whatever was held back."""
        out = "" if self.stopped is not None else self.text[self.shown:]
        self.shown = len(self.text)
        return out


def run(args: argparse.Namespace) -> int:
    import torch

    from bamba.dtypes import dtype_name, parse_dtype
    from bamba.engine.detok import IncrementalDetokenizer
    from bamba.generation import GenerationConfig, GenerationStream
    from bamba.generation_defaults import chosen_generation_defaults, stop_token_ids
    from bamba.native import steady_weights

    text = read_prompt(args.prompt, args.prompt_file)
    dtype = parse_dtype(args.dtype, "--dtype")
    set_threads(args.threads)
    if args.stop is not None and not all(args.stop):
        raise ValueError("--stop must not be empty")
    structured = structured_option(args.json_schema, args.regex)
    lookup = dict(prompt_lookup_tokens=args.prompt_lookup,
                  prompt_lookup_min=args.prompt_lookup_min,
                  prompt_lookup_max=args.prompt_lookup_max)
    GenerationConfig(**sampling_values(args), **lookup)  # bad values fail before the model loads
    chosen = chosen_generation_defaults(args.generation_config)
    if args.compile != "none":
        from bamba.compile import inductor_options

        inductor_options(args.compile)
    rope_scaling = rope_scaling_option(args.rope_scaling)
    model, tokenizer = load_model(args.model, args.tokenizer, dtype, rope_scaling)
    prompt = tokenizer.encode(text)
    if not prompt:
        raise ValueError("the prompt encodes to no tokens")
    defaults = chosen if chosen is not None else model.generation_defaults
    config = GenerationConfig(**sampling_values(args, defaults),
                              eos_token_ids=stop_token_ids(model.config, defaults, tokenizer),
                              structured_outputs=structured, **lookup)
    decode_step = _compiled_step(model, args.compile, len(prompt) + config.max_new_tokens)
    stream = GenerationStream(model, prompt, config, decode_step, tokenizer)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    stops = StopText(args.stop)
    with steady_weights():  # the loop below replaces no weight
        for token in stream:
            _write(stops.feed(detok.add(token)))
            if stops.stopped is not None:
                stream.finish("stop")
    _write(stops.feed(detok.flush()) + stops.rest() + "\n")
    print(_report(stream.result, dtype_name(dtype), torch.get_num_threads()),
          file=sys.stderr)
    return 0


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


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


def _report(result: Any, dtype: str, threads: int) -> str:
    return (f"prefill: {result.prompt_tokens} tokens, {result.prefill_tokens_per_second:.1f} tok/s"
            f" | decode: {result.decode_steps} tokens, {result.decode_tokens_per_second:.1f} tok/s"
            f"{_drafts(result)} | {dtype}, {threads} threads, finish: {result.finish_reason}")


def _drafts(result: Any) -> str:
    if not result.draft_tokens:
        return ""
    return (f" | prompt lookup: {result.accepted_draft_tokens} of {result.draft_tokens} "
            "drafts taken")
