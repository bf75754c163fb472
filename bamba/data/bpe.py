"""``bamba train-tokenizer``: a byte-level BPE tokenizer trained with ``tokenizers``.

Byte-level means every byte has a token, so any text (and any Python source) encodes without an
unknown token. Special tokens: ``<|endoftext|>`` (end of document, the eos token) and ``<|pad|>``.
The result is saved through :class:`bamba.tokenizer.Tokenizer`, i.e. tokenizer.json plus the
tokenizer_config.json that transformers' AutoTokenizer reads (PreTrainedTokenizerFast).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from bamba.data.sources import ReadStats, list_input_files, read_documents

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def iter_texts(files: Sequence[Path], text_field: str, stats: ReadStats) -> Iterator[str]:
    for path in files:
        yield from read_documents(path, text_field=text_field, stats=stats)


def train_bpe(inputs: Sequence[str | os.PathLike], vocab_size: int, out: str | os.PathLike, *,
              text_field: str = "text", min_frequency: int = 2,
              exclude: Sequence[str] = ()) -> ReadStats:
    """Train a byte-level BPE tokenizer on ``inputs`` and save it in ``out``."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from bamba.tokenizer import Tokenizer

    if vocab_size < MIN_VOCAB:
        raise ValueError(f"--vocab-size must be at least {MIN_VOCAB} (256 bytes + specials), "
                         f"got {vocab_size}")
    files = list_input_files(inputs, exclude)
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    stats = ReadStats()
    backend.train_from_iterator(iter_texts(files, text_field, stats), trainer=trainer)
    if stats.documents == 0:
        raise ValueError(f"no documents in {len(files)} input files ({stats.empty} empty, "
                         f"{stats.invalid_utf8} not UTF-8)")
    tok = Tokenizer(backend, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    tok.save(Path(out))
    return stats
