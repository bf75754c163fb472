"""The embedded default model, used when no ``--model`` is given.

``load_default`` is the single place that decides it:

- the checkpoint ``bamba demo`` trained (``$BAMBA_DEMO_DIR`` or ``~/.cache/bamba/demo``, then
  ``train/hf``) when it exists: a tiny hybrid that writes Python-like text;
- otherwise the "tiny" preset with random weights (fixed seed) and a byte-level tokenizer built
  in memory: no download, no training, its text is noise, and it says so.

No trained weights ship inside the package (they would be several MB in git); the demo trains
them in minutes on the machine itself.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers

from bamba.arena import pack_weights
from bamba.config import BambaConfig, preset
from bamba.model import BambaLM, cast, init_weights
from bamba.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_SEED = 0
EOS_TOKEN = "<|endoftext|>"
NOTICE = ("the embedded default is an UNTRAINED, randomly initialised tiny model: "
          "its text is noise (pass --model DIR_OR_ID for a real one)")


def byte_alphabet() -> list[str]:
    """The printable stand-in character of each byte 0..255 (the byte-level BPE convention:
    printable Latin-1 bytes stand for themselves, the rest map to 256 + n in order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def byte_tokenizer() -> Tokenizer:
    """Token i < 256 is byte i; token 256 is <|endoftext|> (EOS). No merges, no BOS."""
    vocab = {char: byte for byte, char in enumerate(byte_alphabet())}
    vocab[EOS_TOKEN] = 256
    backend = Backend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([EOS_TOKEN])
    return Tokenizer(backend, eos_token=EOS_TOKEN)


def default_config() -> BambaConfig:
    """The tiny preset resized to the byte tokenizer's 257 ids."""
    return preset("tiny", vocab_size=257, bos_token_id=None, eos_token_id=256, pad_token_id=None)


def trained_default() -> Path | None:
    """The demo's exported checkpoint if there is one."""
    from bamba.demo import trained_checkpoint

    path = trained_checkpoint()
    return path if (path / "config.json").is_file() else None


def load_default(dtype: torch.dtype = torch.float32) -> tuple[BambaLM, Tokenizer]:
    """(model, tokenizer) of the embedded default: the demo's checkpoint, else the random
    tiny model (with a warning that it is untrained)."""
    trained = trained_default()
    if trained is not None:
        from bamba.checkpoint import from_pretrained, load_tokenizer

        log.info("embedded default: the checkpoint `bamba demo` trained, %s", trained)
        return from_pretrained(trained, dtype=dtype), load_tokenizer(trained)
    log.warning(NOTICE)
    model = cast(init_weights(BambaLM(default_config()), seed=DEFAULT_SEED).eval(), dtype)
    return pack_weights(model), byte_tokenizer()
