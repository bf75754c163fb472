"""Next-token cross-entropy with an optional z-loss; label -100 means "no loss here".

The loss is returned as a SUM over counted tokens so the trainer can divide by the token count
of the whole optimizer step (all micro-batches, all ranks): every token then weighs the same,
however the documents fall into micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class LossSums:
    """Summed terms of one micro-batch (0-dim tensors; ``total`` carries the gradient)."""

    total: torch.Tensor  # ce + z_loss_weight * z
    ce: torch.Tensor
    tokens: int


def lm_loss_sums(logits: torch.Tensor, labels: torch.Tensor, z_loss: float = 0.0) -> LossSums:
    """logits [B, L, V] (already aligned: ``labels[b, t]`` is the target of position t).

    Math in float32 whatever the logits' dtype: log-sum-exp over a large vocabulary in bf16
    loses the small differences the loss is made of. z-loss (PaLM) adds ``z_loss * lse**2``
    per counted token, keeping the softmax normaliser near 1 for stability.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    flat = logits.reshape(-1, logits.shape[-1]).float()  # [B*L, V]
    target = labels.reshape(-1)
    mask = target != IGNORE_INDEX
    ce = F.cross_entropy(flat, target, ignore_index=IGNORE_INDEX, reduction="sum")
    total = ce
    if z_loss:
        lse = torch.logsumexp(flat[mask], dim=-1)
        total = ce + z_loss * lse.square().sum()
    return LossSums(total=total, ce=ce.detach(), tokens=int(mask.sum()))
