"""AdamW with the Bamba hyper-parameters and a decay / no-decay split of the parameters.

Weight decay applies to the matrices that mix features (projections, MLP, LM head, the depthwise
conv kernel). It is skipped for:
  * norms and biases — scale/offset parameters; decaying them only fights the normalisation;
  * ``A_log``, ``D``, ``dt_bias`` — the SSM's decay rates, skip gain and time-step offsets:
    pulling them towards 0 would change the dynamics (A -> 1, dt -> softplus(0)), not shrink them;
  * the token embedding — rows of rare tokens get few gradients, and decay would erase them
    (GPT-NeoX/OLMo practice). The untied LM head is decayed like any projection.
"""

from __future__ import annotations

import torch
from torch import nn

NO_DECAY_LEAVES = ("bias", "A_log", "D", "dt_bias")


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether parameter ``name`` gets weight decay (see the module docstring)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in NO_DECAY_LEAVES or "embed_tokens" in name:
        return False
    return param.dim() >= 2  # 1-D weights are norm scales


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups, parameters in ``named_parameters`` order (a stable order for resume)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decays(name, param) else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over ``param_groups``; the trainer sets each group's ``lr`` every step.

    The fused implementation (one kernel over all parameters; CPU, CUDA, and DTensor shards
    under FSDP2) when every parameter is floating point on one of those devices: one pass over
    all parameters instead of a loop of small kernels per parameter.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be in [0, 1), got {betas}")
    groups = param_groups(model, weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=_fusable(groups))


def _fusable(groups: list[dict]) -> bool:
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                for p in params)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
