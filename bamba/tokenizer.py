"""A small tokenizer over the ``tokenizers`` library, reading and writing the files
transformers' ``AutoTokenizer`` uses (tokenizer.json, tokenizer_config.json,
special_tokens_map.json, chat_template.jinja) so both encode identically.

Special tokens follow transformers' rule: when tokenizer_config.json sets ``add_bos_token`` /
``add_eos_token`` (or tokenizer.json has no post-processor), the post-processor is rebuilt to
add exactly those tokens; otherwise tokenizer.json's own post-processor decides.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend
from tokenizers import processors

from bamba.files import read_json_object

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


class Tokenizer:
    """Text <-> token ids, with the special tokens and chat template of a checkpoint."""

    def __init__(self, backend: Backend, *, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None,
                 unk_token: str | None = None, chat_template: str | None = None,
                 add_bos_token: bool | None = None, add_eos_token: bool | None = None):
        self.backend = backend
        self.special = {"bos_token": bos_token, "eos_token": eos_token,
                        "pad_token": pad_token, "unk_token": unk_token}
        for name, token in self.special.items():
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(f"{name} {token!r} is not in the tokenizer's vocabulary")
        self.chat_template = chat_template
        self.add_bos_token = bool(add_bos_token)
        self.add_eos_token = bool(add_eos_token)
        # Flags given explicitly are written back on save (they make transformers rebuild too).
        self._explicit_flags = add_bos_token is not None or add_eos_token is not None
        if self._explicit_flags or backend.post_processor is None:
            self._rebuild_post_processor()

    def _rebuild_post_processor(self) -> None:
        bos, eos = self.special["bos_token"], self.special["eos_token"]
        self.add_bos_token = self.add_bos_token and bos is not None
        self.add_eos_token = self.add_eos_token and eos is not None
        prefix = [bos] if self.add_bos_token else []
        suffix = [eos] if self.add_eos_token else []
        single = " ".join([*(f"{t}:0" for t in prefix), "$A:0", *(f"{t}:0" for t in suffix)])
        pair = single + " " + " ".join([*(f"{t}:1" for t in prefix), "$B:1",
                                        *(f"{t}:1" for t in suffix)])
        tokens = [(t, self.backend.token_to_id(t)) for t in dict.fromkeys(prefix + suffix)]
        self.backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=tokens)

    # ---- ids of special tokens ---------------------------------------------------------------
    def _id(self, name: str) -> int | None:
        token = self.special[name]
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def eos_token_ids(self) -> list[int]:
        return [] if self.eos_token_id is None else [self.eos_token_id]

    @property
    def pad_token_id(self) -> int | None:
        return self._id("pad_token")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # ---- text <-> ids -------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True, **extra: Any) -> str:
        """Render messages (and ``extra`` names such as ``tools``) with the chat template to a
        prompt string, as transformers does (``bamba.chat_template``)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template")
        from bamba.chat_template import render_template

        special = {k: v for k, v in self.special.items() if v is not None}
        return render_template(self.chat_template, messages=messages,
                               add_generation_prompt=add_generation_prompt, **special, **extra)

    # ---- files --------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Write the files AutoTokenizer reads (each written to a temp name, then replaced)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        special = {k: v for k, v in self.special.items() if v is not None}
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
                                  "clean_up_tokenization_spaces": False}
        if self._explicit_flags:
            config.update(add_bos_token=self.add_bos_token, add_eos_token=self.add_eos_token)
        _atomic_write(directory / TOKENIZER_FILE, self.backend.to_str())
        _atomic_write(directory / TOKENIZER_CONFIG_FILE, json.dumps(config, indent=2) + "\n")
        _atomic_write(directory / SPECIAL_TOKENS_FILE, json.dumps(special, indent=2) + "\n")
        if self.chat_template is not None:
            _atomic_write(directory / CHAT_TEMPLATE_FILE, self.chat_template)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _default_template(value: Any, where: Path) -> str | None:
    """A chat_template entry: a string, or a list of {"name", "template"} (take "default")."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise ValueError(f"{where}: chat_template must be a string or a list with a 'default' entry")


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Read tokenizer.json (+ tokenizer_config.json, special_tokens_map.json, chat template)."""
    directory = Path(directory)
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no tokenizer ({TOKENIZER_FILE} not found)")
    try:
        backend = Backend.from_file(str(path))
    except Exception as exc:  # the Rust library raises a bare Exception on a bad file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: not a valid tokenizer file ({reason})") from None
    config: dict[str, Any] = {}
    for name in (SPECIAL_TOKENS_FILE, TOKENIZER_CONFIG_FILE):  # the config file wins
        if (directory / name).is_file():
            config.update(read_json_object(directory / name))
    template = _default_template(config.get("chat_template"), directory / TOKENIZER_CONFIG_FILE)
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        template = (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    special = {name: _token_text(config.get(name)) for name in SPECIAL_NAMES}
    try:
        return Tokenizer(backend, **special, chat_template=template,
                         add_bos_token=config.get("add_bos_token"),
                         add_eos_token=config.get("add_eos_token"))
    except ValueError as exc:
        raise ValueError(f"{directory / TOKENIZER_CONFIG_FILE}: {exc}") from None
