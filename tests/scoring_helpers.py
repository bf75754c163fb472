"""bamba's own scoring of a text, the reference the lm-eval model and the server's echo
logprobs are held to: the checkpoint's weights on the plain torch path (no kernels, no engine),
one forward, log_softmax."""

from __future__ import annotations

from pathlib import Path

import torch

from bamba.checkpoint import from_pretrained


def plain_model(checkpoint: Path) -> torch.nn.Module:
    return from_pretrained(checkpoint).eval()


def forward_logprobs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """log_softmax of one plain forward over ``ids`` [L, V]."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).float(), dim=-1)[0]
