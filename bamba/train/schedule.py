"""The learning-rate schedule as a pure function of the optimizer step (the Bamba recipe).

Quadratic warm-up to ``peak`` over ``warmup`` steps, then a cosine decay from ``peak`` to
``floor`` that ends at step ``total``; the floor holds after that. Bamba-9B: peak 3e-4,
warm-up 2000 steps, floor 1e-5 (decay factor 0.033).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def lr_at(step: int, *, peak: float, warmup: int, total: int, floor: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based: the first update uses step 0).

    Warm-up is ``peak * ((step + 1) / warmup) ** 2`` so the first update is not wasted at LR 0
    and step ``warmup - 1`` reaches the peak; the cosine runs over steps ``warmup .. total``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup:
        return peak * ((step + 1) / warmup) ** 2
    if step >= total:
        return floor
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """``lr_at`` with its constants bound; call it with a step."""

    peak: float
    warmup: int
    total: int
    floor: float

    def __post_init__(self) -> None:
        if not self.peak > 0:
            raise ValueError(f"peak learning rate must be > 0, got {self.peak}")
        if not 0 <= self.floor <= self.peak:
            raise ValueError(f"lr floor must be in [0, peak={self.peak}], got {self.floor}")
        if self.warmup < 0:
            raise ValueError(f"warmup steps must be >= 0, got {self.warmup}")
        if self.total < self.warmup:
            raise ValueError(f"decay end ({self.total}) must be >= warmup ({self.warmup})")

    def __call__(self, step: int) -> float:
        return lr_at(step, peak=self.peak, warmup=self.warmup, total=self.total, floor=self.floor)
