"""Options the inference verbs share (``generate``, ``chat``, ``serve``), so they accept the same
names with the same defaults: weights dtype, a tokenizer override, a RoPE scaling override,
sampling; and loading the
tokenizer before the weights, so a checkpoint without one fails fast and says what to do."""

from __future__ import annotations

import argparse
import json
from typing import Any

from bamba.dtypes import DEFAULT_DTYPE, DTYPE_HELP
from bamba.ops.rope import ROPE_TYPES, rope_type_of


def add_model_options(parser: argparse.ArgumentParser, rope_scaling: bool = True) -> None:
    """--dtype, --tokenizer and (unless the verb has its own) --rope-scaling."""
    parser.add_argument("--dtype", default=DEFAULT_DTYPE, help=f"weights: {DTYPE_HELP}")
    parser.add_argument("--tokenizer", default=None, metavar="DIR_OR_ID",
                        help="tokenizer directory or hub id (default: the checkpoint's own; "
                             "needed when it was saved without one)")
    if not rope_scaling:
        return
    parser.add_argument("--rope-scaling", default=None, metavar="JSON",
                        help="RoPE scaling of the attention layers as in config.json's "
                             "rope_parameters, replacing the checkpoint's, e.g. "
                             "'{\"rope_type\": \"yarn\", \"factor\": 4}' (types: "
                             f"{', '.join(ROPE_TYPES[1:])}; the context grows by the factor); "
                             "default: the checkpoint's")


def json_object_option(text: str, flag: str) -> dict[str, Any]:
    """An option's JSON object; ValueError naming the option otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{flag}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag}: expected a JSON object, got {text!r}")
    return value


def add_speculative_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--speculative-config", default=None, metavar="JSON",
                        help='prompt-lookup decoding, vLLM\'s form: {"method": "ngram", '
                             '"num_speculative_tokens": 4} (and "prompt_lookup_max", '
                             '"prompt_lookup_min"); drafts are checked while no request '
                             "waits for its prompt, 8 tokens a step in all")


def speculative_option(text: str | None) -> dict[str, Any] | None:
    """--speculative-config's JSON object, checked before the model loads."""
    if text is None:
        return None
    from bamba.engine.lookup import lookup_from_config

    config = json_object_option(text, "--speculative-config")
    try:
        lookup_from_config(config)
    except ValueError as exc:
        raise ValueError(f"--speculative-config: {exc}") from None
    return config


def rope_scaling_option(text: str | None) -> dict[str, Any] | None:
    """--rope-scaling's JSON object (None when not given); ValueError names what is wrong
    before the model loads (its fields are checked against the model as it loads)."""
    if text is None:
        return None
    scaling = json_object_option(text, "--rope-scaling")
    kind = rope_type_of(scaling)
    if kind not in ROPE_TYPES:
        raise ValueError(f"--rope-scaling: unknown rope_type {kind!r}; known: "
                         f"{', '.join(ROPE_TYPES)}")
    return scaling


def add_sampling_options(parser: argparse.ArgumentParser, *, max_new_tokens: int,
                         temperature: float) -> None:
    """Sampling and stopping options (vLLM/OpenAI semantics, see ``bamba.sampling``). Each
    left out takes the checkpoint's generation_config.json value where it sets one, else the
    verb's default (``sampling_values``)."""
    builtin = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": 0,
               "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
               "frequency_penalty": 0.0, "seed": None}
    parser.set_defaults(builtin_sampling=builtin)
    parser.add_argument("--max-new-tokens", type=int, metavar="N",
                        help=f"tokens to generate at most (default: {max_new_tokens})")
    parser.add_argument("--temperature", type=float, metavar="T",
                        help=f"0 = greedy (default: {temperature})")
    parser.add_argument("--top-k", type=int, metavar="K",
                        help="keep the K most likely tokens; 0 = off (default: 0)")
    parser.add_argument("--top-p", type=float, metavar="P",
                        help="keep the most likely tokens up to this mass; 1 = off (default: 1)")
    parser.add_argument("--min-p", type=float, metavar="P",
                        help="drop tokens less likely than P times the most likely; 0 = off "
                             "(default: 0)")
    parser.add_argument("--repetition-penalty", type=float, metavar="R",
                        help="divide the logits of tokens already in prompt or output by R "
                             "(> 1 repeats less); 1 = off (default: 1)")
    parser.add_argument("--presence-penalty", type=float, metavar="X",
                        help="subtract X from tokens already in the output, in [-2, 2]; 0 = off")
    parser.add_argument("--frequency-penalty", type=float, metavar="X",
                        help="subtract X times a token's count in the output, in [-2, 2]; 0 = off")
    parser.add_argument("--seed", type=int, help="seed for sampling")
    parser.add_argument("--stop", action="append", default=None, metavar="TEXT",
                        help="stop before this text (not printed); repeat for several")
    add_generation_config_option(parser)


def add_generation_config_option(parser: argparse.ArgumentParser) -> None:
    """--generation-config: whose generation defaults apply (``bamba.generation_defaults``)."""
    parser.add_argument("--generation-config", default="auto", metavar="auto|none|PATH",
                        help="sampling defaults for what the command (or a request) leaves "
                             "out, and extra stop ids: auto = the checkpoint's "
                             "generation_config.json (a GGUF file's sampling keys); none = "
                             "ignore it; or a directory or file to read one from "
                             "(default: auto)")


def sampling_values(args: argparse.Namespace, defaults: Any = None) -> dict[str, Any]:
    """The sampling options and max_new_tokens by the field names ``GenerationConfig`` uses:
    each as given, else ``defaults``' (a ``GenerationDefaults``: the checkpoint's), else the
    verb's own default."""
    checkpoint = {} if defaults is None else defaults.to_dict()
    return {name: getattr(args, name) if getattr(args, name) is not None
            else checkpoint.get(name, builtin)
            for name, builtin in args.builtin_sampling.items()}


def set_threads(threads: int | None) -> None:
    """torch's thread count from --threads (None: one per core), fewer when other processes
    keep the cores busy (``bamba.cores``, which says so in one line)."""
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    from bamba.cores import choose_threads

    threads = choose_threads(threads)
    if threads is None:
        return
    import torch

    torch.set_num_threads(threads)


def checkpoint_tokenizer(model_ref: str, tokenizer_ref: str | None) -> Any:
    """The --tokenizer given, else the checkpoint's own; a checkpoint saved without one fails
    here (before its weights load) naming --tokenizer."""
    from bamba.checkpoint import load_tokenizer, resolve_checkpoint
    from bamba.tokenizer import TOKENIZER_FILE

    if tokenizer_ref is not None:
        return load_tokenizer(tokenizer_ref)
    from bamba.gguf.reader import is_gguf

    if is_gguf(model_ref):  # a GGUF file carries its tokenizer
        return load_tokenizer(model_ref)
    directory = resolve_checkpoint(model_ref)
    if not (directory / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"{directory}: no tokenizer ({TOKENIZER_FILE} not found); "
                                f"pass --tokenizer DIR_OR_ID")
    return load_tokenizer(directory)


def load_model(model_ref: str | None, tokenizer_ref: str | None, dtype: Any,
               rope_scaling: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """(model, tokenizer); no ``model_ref`` means the embedded default (which warns, once, if it
    is the untrained one);
    ``rope_scaling`` replaces the model's RoPE scaling."""
    if model_ref is None:
        from bamba.config import with_rope_scaling
        from bamba.default_model import load_default

        model, tokenizer = load_default(dtype)
        model.config = with_rope_scaling(model.config, rope_scaling)
        if tokenizer_ref is not None:
            from bamba.checkpoint import load_tokenizer

            tokenizer = load_tokenizer(tokenizer_ref)
        return model, tokenizer
    from bamba.checkpoint import from_pretrained

    tokenizer = checkpoint_tokenizer(model_ref, tokenizer_ref)
    return from_pretrained(model_ref, dtype=dtype, rope_scaling=rope_scaling), tokenizer
