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

SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                   "presence_penalty", "frequency_penalty", "seed")


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


def rope_scaling_option(text: str | None) -> dict[str, Any] | None:
    """--rope-scaling's JSON object (None when not given); ValueError names what is wrong
    before the model loads (its fields are checked against the model as it loads)."""
    if text is None:
        return None
    try:
        scaling = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--rope-scaling: not valid JSON ({exc.msg} at column {exc.colno})"
                         ) from None
    if not isinstance(scaling, dict):
        raise ValueError(f"--rope-scaling: expected a JSON object, got {text!r}")
    kind = rope_type_of(scaling)
    if kind not in ROPE_TYPES:
        raise ValueError(f"--rope-scaling: unknown rope_type {kind!r}; known: "
                         f"{', '.join(ROPE_TYPES)}")
    return scaling


def add_sampling_options(parser: argparse.ArgumentParser, *, max_new_tokens: int,
                         temperature: float) -> None:
    """Sampling and stopping options (vLLM/OpenAI semantics, see ``bamba.sampling``)."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                        help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=temperature, metavar="T",
                        help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, metavar="K",
                        help="keep the K most likely tokens; 0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P",
                        help="keep the most likely tokens up to this mass; 1 = off")
    parser.add_argument("--min-p", type=float, default=0.0, metavar="P",
                        help="drop tokens less likely than P times the most likely; 0 = off")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                        help="divide the logits of tokens already in prompt or output by R "
                             "(> 1 repeats less); 1 = off")
    parser.add_argument("--presence-penalty", type=float, default=0.0, metavar="X",
                        help="subtract X from tokens already in the output, in [-2, 2]; 0 = off")
    parser.add_argument("--frequency-penalty", type=float, default=0.0, metavar="X",
                        help="subtract X times a token's count in the output, in [-2, 2]; 0 = off")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--stop", action="append", default=None, metavar="TEXT",
                        help="stop before this text (not printed); repeat for several")


def sampling_values(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling options by the field names ``GenerationConfig`` and ``SamplingParams`` share."""
    return {name: getattr(args, name) for name in SAMPLING_FIELDS}


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
