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

Product = Callable[[torch.Tensor, int], torch.Tensor]  # (rows, expert) -> rows x its weight^T


def route(logits: torch.Tensor, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, k] in ``dtype``, expert indices [T, k]): the top k
    logits' softmax (float32)."""
    top, index = logits.float().topk(k, dim=-1)
    return torch.softmax(top, dim=-1).to(dtype), index


def mixture(x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor,
            gate_up: Product, down: Product) -> torch.Tensor:
    """x [T, D] through the experts each token was routed to: sum over its k experts of
    weight * down_e(silu(gate_e(x)) * up_e(x)), where gate_up(rows, e) multiplies rows [R, D]
    by expert e's [2F, D] weight and down(rows, e) rows [R, F] by its [D, F] one (only the
    picked experts are asked for)."""
    out = torch.zeros_like(x)
    for expert in torch.unique(index).tolist():  # ascending: the order of the sums
        rows, slot = torch.where(index == expert)
        gate, up = gate_up(x[rows], expert).chunk(2, dim=-1)
        y = down(F.silu(gate) * up, expert) * weights[rows, slot, None]
        out.index_add_(0, rows, y.to(out.dtype))
    return out
