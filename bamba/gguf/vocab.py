"""Our byte-level BPE tokenizer <-> GGUF tokenizer metadata (``tokenizer.ggml.*``).

GGUF keeps a BPE tokenizer as model ``gpt2``: every token's text (in id order), a type per token,
the merges ("a b"), the special ids, and a pre-tokenizer *name* that llama.cpp maps to its split
regex (``src/llama-vocab.cpp``). The splits read and written here: GPT-2's (tokenizers'
ByteLevel with its regex; llama.cpp's ``gpt-2``), Llama 3's (a Split regex before a ByteLevel
without one: ``llama-bpe``, whose words held whole in the vocabulary skip the merges, or
``dbrx`` where they do not, as cl100k-style tokenizers such as Granite's have it) and Qwen2's
(Llama 3's with single digits: ``qwen2``). A tokenizer that splits otherwise is refused rather
than exported wrongly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, NamedTuple

from bamba.tokenizer import Tokenizer

GPT2 = "gpt-2"
# llama.cpp's token types
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}", 1)


class Split(NamedTuple):
    """A pre-tokenizer: its split regex as tokenizers' Split holds it (None: GPT-2's, inside
    ByteLevel), and whether words the vocabulary holds whole skip the merges."""
    regex: str | None
    ignore_merges: bool


# llama.cpp's pre-tokenizer names -> the split each stands for; the first of a split is the
# name an export writes.
SPLITS = {GPT2: Split(None, False), "phi-2": Split(None, False), "mpt": Split(None, False),
          "olmo": Split(None, False),
          "llama-bpe": Split(_LLAMA3_REGEX, True), "llama3": Split(_LLAMA3_REGEX, True),
          "llama-v3": Split(_LLAMA3_REGEX, True), "falcon3": Split(_LLAMA3_REGEX, True),
          "falcon-h1": Split(_LLAMA3_REGEX, True), "pixtral": Split(_LLAMA3_REGEX, True),
          "dbrx": Split(_LLAMA3_REGEX, False), "smaug-bpe": Split(_LLAMA3_REGEX, False),
          "qwen2": Split(_QWEN2_REGEX, False), "deepseek-r1-qwen": Split(_QWEN2_REGEX, False),
          "stablelm2": Split(_QWEN2_REGEX, False), "megrez": Split(_QWEN2_REGEX, False)}


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
    pre: str = GPT2  # llama.cpp's pre-tokenizer name (a key of SPLITS)


def _split_name(raw: dict[str, Any]) -> str:
    """The llama.cpp name of a tokenizer.json's pre-tokenizer (ValueError for a split GGUF
    has no name for here)."""
    pre, model = raw.get("pre_tokenizer") or {}, raw.get("model") or {}
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    last = parts[-1] if parts else {}
    if raw.get("normalizer") or last.get("type") != "ByteLevel" or last.get("add_prefix_space"):
        found = None
    elif len(parts) == 1:
        found = Split(None, bool(model.get("ignore_merges"))) \
            if last.get("use_regex", True) else None
    elif len(parts) == 2 and not last.get("use_regex", True) and parts[0].get("type") == "Split" \
            and parts[0].get("behavior") == "Isolated" and not parts[0].get("invert"):
        found = Split((parts[0].get("pattern") or {}).get("Regex"),
                      bool(model.get("ignore_merges")))
    else:
        found = None
    name = next((n for n, split in SPLITS.items() if split == found), None)
    if name is None:
        raise ValueError("GGUF export needs a byte-level pre-tokenizer llama.cpp names (GPT-2's, "
                         "Llama 3's or Qwen2's split, no prefix space, no normalizer), got "
                         f"{pre.get('type')!r}")
    return name


def vocab_of(tokenizer: Tokenizer, vocab_size: int) -> GGUFVocab:
    """The GGUF view of ``tokenizer``, padded to the model's ``vocab_size`` with unused tokens."""
    raw = json.loads(tokenizer.backend.to_str())
    model = raw.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ValueError("GGUF export needs a byte-level BPE tokenizer (model type BPE, "
                         f"no byte fallback), got {model.get('type')!r}")
    split = _split_name(raw)
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
                     add_bos, add_eos, tokenizer.chat_template, split)


def write_vocab(writer: Any, vocab: GGUFVocab) -> None:
    """Add the tokenizer keys to a ``gguf.GGUFWriter``."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
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
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    table = {text: i for i, (text, kind) in enumerate(zip(vocab.tokens, vocab.token_types))
             if kind != UNUSED}
    pairs = [tuple(m.split(" ", 1)) for m in vocab.merges]
    if any(len(p) != 2 for p in pairs):
        raise ValueError("tokenizer.ggml.merges: a merge is not two tokens separated by a space")
    split = SPLITS[vocab.pre]
    backend = Backend(models.BPE(vocab=table, merges=pairs, ignore_merges=split.ignore_merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split.regex is None)
    backend.pre_tokenizer = byte_level if split.regex is None else pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split.regex), behavior="isolated", invert=False), byte_level])
    backend.decoder = decoders.ByteLevel()
    added = [AddedToken(vocab.tokens[i], special=kind == CONTROL, normalized=False)
             for i, kind in enumerate(vocab.token_types) if kind in (CONTROL, USER_DEFINED)]
    backend.add_tokens([a for a in added if not a.special])
    backend.add_special_tokens([a for a in added if a.special])
    names = {f"{k}_token": vocab.tokens[i] for k, i in vocab.special_ids.items()
             if 0 <= i < len(vocab.tokens)}
    return Tokenizer(backend, **names, chat_template=vocab.chat_template,
                     add_bos_token=vocab.add_bos_token, add_eos_token=vocab.add_eos_token)
