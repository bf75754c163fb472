"""A checkpoint's generation defaults: what its ``generation_config.json`` (or a GGUF file's
``general.sampling.*`` keys) asks of generation where the caller does not say.

Read as vLLM reads it (its ``--generation-config auto``): the sampling fields the file sets
(temperature, top_k, top_p, min_p, repetition_penalty) become defaults that a request's own
values override, ``max_new_tokens`` the default length, and ``eos_token_id`` (an id or a list)
ids to stop at beside the model config's (transformers stops at them too). ``do_sample`` is
not read, as vLLM does not read it: a file that sets a temperature samples at it unless the
caller asks for temperature 0. Fields not named here are ignored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GENERATION_CONFIG_NAME = "generation_config.json"
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
# Where llama.cpp keeps the same fields in a GGUF file. Its repeat penalty covers the last 64
# tokens, not the whole context as repetition_penalty does, so it is neither read nor written.
GGUF_SAMPLING_KEYS = {"temperature": "general.sampling.temp", "top_k": "general.sampling.top_k",
                      "top_p": "general.sampling.top_p", "min_p": "general.sampling.min_p"}
# The values generation_config may hold for "read the checkpoint's" and "ignore it".
AUTO, NONE = "auto", "none"


@dataclass(frozen=True)
class GenerationDefaults:
    """sampling: the fields a checkpoint sets, by ``SamplingValues`` name; max_new_tokens: its
    default length (None: the caller's); eos_token_ids: ids to stop at besides the config's."""

    sampling: dict[str, float | int] = field(default_factory=dict)
    max_new_tokens: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> GenerationDefaults:
        """From generation_config.json's fields; one ValueError line naming ``source`` and the
        field for a value out of range or of the wrong type."""
        from bamba.sampling import SamplingValues, require_int

        sampling = {k: data[k] for k in SAMPLING_KEYS if data.get(k) is not None}
        try:
            SamplingValues(**sampling).check_sampling_values()
            length = data.get("max_new_tokens")
            if length is not None:
                require_int(length, "max_new_tokens", 1)
            eos = data.get("eos_token_id")
            eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
            for token in eos:
                require_int(token, "eos_token_id", 0)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None
        return cls(sampling, length, tuple(eos))

    def to_dict(self) -> dict[str, Any]:
        """The sampling fields and max_new_tokens as generation_config.json holds them."""
        extra = {} if self.max_new_tokens is None else {"max_new_tokens": self.max_new_tokens}
        return {**self.sampling, **extra}


def read_generation_defaults(path: str | os.PathLike) -> GenerationDefaults:
    """The defaults of a checkpoint directory's generation_config.json (or of that file);
    none when a directory has no such file."""
    from bamba.files import read_json_object

    path = Path(path).expanduser()
    if path.is_dir():
        path = path / GENERATION_CONFIG_NAME
        if not path.is_file():
            return GenerationDefaults()
    elif not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or directory")
    return GenerationDefaults.from_dict(read_json_object(path), str(path))


def chosen_generation_defaults(choice: str | os.PathLike) -> GenerationDefaults | None:
    """What a ``generation_config`` choice names: None for "auto" (the model's own, read as it
    loads), no defaults for "none", else those of the directory or file given (read now, so a
    bad one fails before any model loads)."""
    if choice == AUTO:
        return None
    if choice == NONE:
        return GenerationDefaults()
    return read_generation_defaults(choice)


def stop_token_ids(config: Any, defaults: GenerationDefaults, tokenizer: Any = None
                   ) -> list[int]:
    """The ids generation stops at: the model config's EOS ids, the generation defaults', and
    the tokenizer's EOS token."""
    ids = set(config.eos_token_ids) | set(defaults.eos_token_ids)
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)
