"""Next-token cross-entropy with an optional z-loss; label -100 means "no loss here".

The loss is returned as a SUM over counted tokens so the trainer can divide by the token count
of the whole optimizer step (all micro-batches, all ranks): every token then weighs the same,
however the documents fall into micro-batches.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

LossFn = Callable[[torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LossSums:
    """Summed terms of one micro-batch (0-dim tensors; ``total`` carries the gradient)."""

    total: torch.Tensor  # ce + z_loss_weight * z
    ce: torch.Tensor
    tokens: int


def loss_terms(logits: torch.Tensor, labels: torch.Tensor,
               z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, ce) summed over counted tokens; logits [B, L, V] aligned with labels [B, L].

    Math in float32 whatever the logits' dtype: log-sum-exp over a large vocabulary in bf16
    loses the small differences the loss is made of. z-loss (PaLM) adds ``z_loss * lse**2``
    per counted token, keeping the softmax normaliser near 1 for stability; ignored tokens are
    zeroed with a select, not dropped by boolean indexing (no copy of the logits, and a fixed
    shape for torch.compile).
    """
    flat = logits.reshape(-1, logits.shape[-1]).float()  # [B*L, V]
    target = labels.reshape(-1)
    ce = F.cross_entropy(flat, target, ignore_index=IGNORE_INDEX, reduction="sum")
    if not z_loss:
        return ce, ce
    lse = torch.logsumexp(flat, dim=-1)
    z = torch.where(target != IGNORE_INDEX, lse.square(), 0.0).sum()
    return ce + z_loss * z, ce


@functools.cache
def compiled_loss_terms() -> LossFn:
    """``loss_terms`` through torch.compile (cast, log-sum-exp and their backward fused):
    the trainer's loss when ``compile: true``. Built once per process."""
    return torch.compile(loss_terms, dynamic=False)


def lm_loss_sums(logits: torch.Tensor, labels: torch.Tensor, z_loss: float = 0.0,
                 terms: LossFn = loss_terms) -> LossSums:
    """``terms`` (``loss_terms`` or its compiled form) with the shapes checked and the counted
    tokens; ``ce`` is detached."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    total, ce = terms(logits, labels, z_loss)
    return LossSums(total=total, ce=ce.detach(), tokens=int((labels != IGNORE_INDEX).sum()))
