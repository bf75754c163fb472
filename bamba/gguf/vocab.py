"""Our byte-level BPE tokenizer <-> GGUF tokenizer metadata (``tokenizer.ggml.*``).

GGUF keeps a BPE tokenizer as model ``gpt2``: every token's text (in id order), a type per token,
the merges ("a b"), the special ids, and a pre-tokenizer *name* that llama.cpp maps to its split
regex. Ours splits text as GPT-2 does (``tokenizers``' ByteLevel with its regex), which llama.cpp
calls ``gpt-2``; a tokenizer that splits otherwise is refused rather than exported wrongly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from bamba.tokenizer import Tokenizer

PRE_TOKENIZER = "gpt-2"
# llama.cpp's token types
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass(frozen=True)
class GGUFVocab:
    """What GGUF stores of a tokenizer."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]  # "bos" / "eos" / "pad" / "unk" -> id
    add_bos_token: bool
    add_eos_token: bool
    chat_template: str | None


def vocab_of(tokenizer: Tokenizer, vocab_size: int) -> GGUFVocab:
    """The GGUF view of ``tokenizer``, padded to the model's ``vocab_size`` with unused tokens."""
    raw = json.loads(tokenizer.backend.to_str())
    model, pre = raw.get("model") or {}, raw.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ValueError("GGUF export needs a byte-level BPE tokenizer (model type BPE, "
                         f"no byte fallback), got {model.get('type')!r}")
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) \
            or pre.get("add_prefix_space") or raw.get("normalizer"):
        raise ValueError("GGUF export needs GPT-2's byte-level pre-tokenizer (ByteLevel with its "
                         f"regex, no prefix space, no normalizer), got {pre.get('type')!r}")
    vocab: dict[str, int] = dict(model["vocab"])
    special: set[str] = set()
    user: set[str] = set()
    for added in raw.get("added_tokens") or []:
        vocab[added["content"]] = added["id"]
        (special if added.get("special") else user).add(added["content"])
    size = max(vocab_size, max(vocab.values()) + 1)
    tokens: list[str | None] = [None] * size
    for text, index in vocab.items():
        tokens[index] = text
    types = [UNUSED if t is None else CONTROL if t in special else USER_DEFINED if t in user
             else NORMAL for t in tokens]
    filled = [f"[PAD{i}]" if t is None else t for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    ids = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad")}
    unk = tokenizer.special.get("unk_token")
    ids["unk"] = None if unk is None else tokenizer.backend.token_to_id(unk)
    probe = tokenizer.encode("a")  # what the post-processor adds, whichever way it was set
    add_bos = ids["bos"] is not None and probe[:1] == [ids["bos"]]
    add_eos = ids["eos"] is not None and probe[-1:] == [ids["eos"]]
    return GGUFVocab(filled, types, merges, {k: v for k, v in ids.items() if v is not None},
                     add_bos, add_eos, tokenizer.chat_template)


def write_vocab(writer: Any, vocab: GGUFVocab) -> None:
    """Add the tokenizer keys to a ``gguf.GGUFWriter``."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    for name, index in vocab.special_ids.items():
        getattr(writer, f"add_{name}_token_id")(index)
    writer.add_add_bos_token(vocab.add_bos_token)
    writer.add_add_eos_token(vocab.add_eos_token)
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)


def tokenizer_from(vocab: GGUFVocab) -> Tokenizer:
    """A ``Tokenizer`` that encodes as the GGUF's gpt2 vocabulary does."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    table = {text: i for i, (text, kind) in enumerate(zip(vocab.tokens, vocab.token_types))
             if kind != UNUSED}
    pairs = [tuple(m.split(" ", 1)) for m in vocab.merges]
    if any(len(p) != 2 for p in pairs):
        raise ValueError("tokenizer.ggml.merges: a merge is not two tokens separated by a space")
    backend = Backend(models.BPE(vocab=table, merges=pairs))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    added = [AddedToken(vocab.tokens[i], special=kind == CONTROL, normalized=False)
             for i, kind in enumerate(vocab.token_types) if kind in (CONTROL, USER_DEFINED)]
    backend.add_tokens([a for a in added if not a.special])
    backend.add_special_tokens([a for a in added if a.special])
    names = {f"{k}_token": vocab.tokens[i] for k, i in vocab.special_ids.items()
             if 0 <= i < len(vocab.tokens)}
    return Tokenizer(backend, **names, chat_template=vocab.chat_template,
                     add_bos_token=vocab.add_bos_token, add_eos_token=vocab.add_eos_token)
