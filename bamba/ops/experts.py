"""Mixture of experts as Granite 4.0's MoE hybrids route it: each token goes to the top k of E
experts by its router logits, weighted by the softmax over those k logits; every expert is a
SwiGLU block whose gate and up projections are one [2F, D] matrix.

Rounded as transformers' ``GraniteMoeHybridMoE`` rounds it: the router logits are computed
in the activations' dtype and soft-maxed in float32, the weights cast back; the experts'
outputs are summed into a zero tensor of the activations' dtype one expert at a time, in
expert order.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

Weight = Callable[[int], torch.Tensor]  # expert index -> its weight


def route(logits: torch.Tensor, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, k] in ``dtype``, expert indices [T, k]): the top k
    logits' softmax (float32)."""
    top, index = logits.float().topk(k, dim=-1)
    return torch.softmax(top, dim=-1).to(dtype), index


def mixture(x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor,
            gate_up: Weight, down: Weight) -> torch.Tensor:
    """x [T, D] through the experts each token was routed to: sum over its k experts of
    weight * down_e(silu(gate_e(x)) * up_e(x)), with gate_up(e) [2F, D] and down(e) [D, F]
    expert e's weights (only the picked experts' are asked for)."""
    out = torch.zeros_like(x)
    for expert in torch.unique(index).tolist():  # ascending: the order of the sums
        rows, slot = torch.where(index == expert)
        gate, up = F.linear(x[rows], gate_up(expert)).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down(expert)) * weights[rows, slot, None]
        out.index_add_(0, rows, y.to(out.dtype))
    return out
