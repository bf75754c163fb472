"""Fine-tuning data: chat or instruction JSONL -> packed rows with loss on assistant tokens only.

Each JSONL line is either ``{"messages": [{"role", "content"}, ...]}`` (rendered with the
tokenizer's chat template, or ``DEFAULT_CHAT_TEMPLATE`` when it has none) or
``{"prompt": ..., "completion": ...}`` (plain text, EOS appended to the completion).

Loss mask: a conversation is rendered piece by piece: for every assistant message, the text
up to the generation prompt (masked) and then the message itself (trained on). The pieces are
tokenized separately and concatenated, so every token belongs to exactly one piece. (A BPE
merge across a piece boundary that encoding the whole string at once would make is not made:
the model sees at the boundary exactly what generation after the prompt sees.)

Packing: whole examples fill rows of ``seq_len`` in a seeded per-epoch order; an example that
does not fit starts the next row; the rest of the row is padding (no loss). An example longer
than a row is truncated (logged). Row ``g`` of the global stream is a pure function of
(seed, g), so the state is one number and resuming at any world size continues the stream.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from bamba.train.data import RowStream
from bamba.train.loss import IGNORE_INDEX

log = logging.getLogger(__name__)

# Used when the tokenizer brings no template: role headers, EOS closing every assistant turn.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

Example = tuple[list[int], list[bool]]  # token ids, "train on this token"


def _pieces(messages: list[dict[str, Any]], render) -> list[tuple[str, bool]]:
    """(text, trained) pieces whose concatenation is the rendered conversation."""
    pieces, done = [], ""
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = render(messages[:i], True)
        full = render(messages[:i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError("chat template does not render conversations as growing prefixes")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    if not pieces:
        raise ValueError("conversation has no assistant message")
    return pieces


def encode_example(record: dict[str, Any], tokenizer: Any) -> Example:
    """Token ids and loss mask of one JSONL record (see the module docstring)."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("'messages' must be a list of {role, content} objects")
        template = tokenizer.chat_template

        def render(msgs: list[dict[str, Any]], gen: bool) -> str:
            if template is None:
                tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
            try:
                return tokenizer.apply_chat_template(msgs, add_generation_prompt=gen)
            finally:
                tokenizer.chat_template = template

        pieces = _pieces(messages, render)
    elif "prompt" in record and "completion" in record:
        pieces = [(str(record["prompt"]), False), (str(record["completion"]), True)]
    else:
        raise ValueError("a record needs 'messages' or 'prompt' and 'completion'")
    ids: list[int] = []
    train: list[bool] = []
    for text, trained in pieces:
        piece = tokenizer.encode(text, add_special_tokens=False) if text else []
        ids += piece
        train += [trained] * len(piece)
    if "messages" not in record and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        train.append(True)
    return ids, train


def load_examples(path: str | os.PathLike, tokenizer: Any) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such fine-tuning file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    examples = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            examples.append(encode_example(record, tokenizer))
        except (json.JSONDecodeError, ValueError) as exc:
            raise ValueError(f"{path}:{n}: {exc}") from None
    if not any(any(train) for _, train in examples):
        raise ValueError(f"{path}: no example with tokens to train on")
    return examples


def pack_rows(examples: list[Example], order: list[int], seq_len: int, pad_id: int
              ) -> list[dict[str, torch.Tensor]]:
    """Greedy packing of whole examples (in ``order``) into rows of ``seq_len`` positions.
    An example of n tokens takes n - 1 positions (inputs t[:-1], labels t[1:])."""
    rows, current = [], []
    used = 0
    for i in order:
        ids, train = examples[i]
        if len(ids) < 2:
            continue
        if len(ids) - 1 > seq_len:
            log.debug("example %d (%d tokens) truncated to %d", i, len(ids), seq_len + 1)
            ids, train = ids[:seq_len + 1], train[:seq_len + 1]
        if used + len(ids) - 1 > seq_len:
            rows.append(_row(current, seq_len, pad_id))
            current, used = [], 0
        current.append((ids, train))
        used += len(ids) - 1
    if current:
        rows.append(_row(current, seq_len, pad_id))
    return rows


def _row(examples: list[Example], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    inputs, labels, seq_idx = [], [], []
    for doc, (ids, train) in enumerate(examples):
        inputs += ids[:-1]
        labels += [t if keep else IGNORE_INDEX for t, keep in zip(ids[1:], train[1:])]
        seq_idx += [doc] * (len(ids) - 1)
    pad = seq_len - len(inputs)
    inputs += [pad_id] * pad
    labels += [IGNORE_INDEX] * pad
    seq_idx += [len(examples)] * pad  # padding is a document of its own
    return {"input_ids": torch.tensor(inputs), "labels": torch.tensor(labels),
            "seq_idx": torch.tensor(seq_idx)}


class SFTSource(RowStream):
    """Packed fine-tuning rows as a ``BatchSource``: epochs of seeded permutations of the
    examples, one global row stream shared by all ranks in lockstep (see ``RowStream``)."""

    def __init__(self, examples: list[Example], *, seq_len: int, batch_size: int, pad_id: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        super().__init__(batch_size, rank, world_size)
        self.examples, self.seq_len, self.pad_id, self.seed = examples, seq_len, pad_id, seed
        self._lengths: dict[int, int] = {}  # rows per epoch
        self._cached: tuple[int, list[dict[str, torch.Tensor]]] = (-1, [])

    def _epoch(self, epoch: int) -> list[dict[str, torch.Tensor]]:
        if self._cached[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.examples), generator=gen).tolist()
            self._cached = (epoch, pack_rows(self.examples, order, self.seq_len, self.pad_id))
            self._lengths[epoch] = len(self._cached[1])
        return self._cached[1]

    def row(self, g: int) -> dict[str, torch.Tensor]:
        epoch = 0  # epochs may pack into different numbers of rows
        while g >= self._length(epoch):
            g -= self._length(epoch)
            epoch += 1
        return self._epoch(epoch)[g]

    def _length(self, epoch: int) -> int:
        if epoch not in self._lengths:
            self._epoch(epoch)
        return self._lengths[epoch]

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "seed": self.seed, "examples": len(self.examples)}

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        if isinstance(state, list):  # the stream is global: every rank's state is the same
            state = state[0]
        if state.get("seed") != self.seed or state.get("examples") != len(self.examples):
            raise ValueError("fine-tuning data state is for another seed or data file")
        self.rows = int(state["rows"])
