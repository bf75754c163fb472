"""Turn packed rows (tokens + document keys) into a training batch.

A row holds ``seq_len + 1`` tokens: ``input_ids = row[:-1]``, ``labels = row[1:]``. Document
boundaries stay visible: ``seq_idx`` numbers the documents within a row (0, 1, 2, ...: the
Mamba2 ``seq_idx`` convention, so the SSM state and conv can reset) and ``position_ids`` restart
at 0 where each document (or the row) starts. With ``mask_boundary`` a label whose token belongs
to a different document than its input token is -100: the model is not asked to predict the
first token of a document from the previous one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

IGNORE_INDEX = -100


def pack_batch(rows: Sequence[tuple[np.ndarray, np.ndarray]], mask_boundary: bool = True
               ) -> dict[str, torch.Tensor]:
    """Rows of (tokens, keys), each (L+1,) -> input_ids/labels/position_ids/seq_idx (B, L)
    and doc_keys (B, L+1)."""
    tokens = torch.from_numpy(np.stack([t for t, _ in rows]))  # (B, L+1)
    keys = torch.from_numpy(np.stack([k for _, k in rows]))  # (B, L+1)
    inputs_keys = keys[:, :-1]
    starts = torch.ones_like(inputs_keys, dtype=torch.bool)
    starts[:, 1:] = inputs_keys[:, 1:] != inputs_keys[:, :-1]  # a new document begins here
    seq_idx = starts.cumsum(dim=1) - 1  # (B, L)
    index = torch.arange(inputs_keys.shape[1]).expand_as(inputs_keys)
    start_pos = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    labels = tokens[:, 1:].clone()
    if mask_boundary:
        labels[keys[:, 1:] != inputs_keys] = IGNORE_INDEX
    return {"input_ids": tokens[:, :-1].contiguous(), "labels": labels,
            "position_ids": index - start_pos, "seq_idx": seq_idx.to(torch.int32),
            "doc_keys": keys}
