"""Where every consumer is in a dataset's global document order, and how to re-split it.

The global order of dataset d in epoch e is ``perm(d, e)`` applied to positions 0..N-1 (see
permute.py); it depends only on the seed. A *view* is what is left of one epoch's positions:
all positions below ``frontier`` are taken, and so are the listed ``holes`` above it; the rest,
in increasing order, is the sequence R. With C consumers, consumer c takes R[c], R[c+C],
R[c+2C], ... — an interleaved slice derived from (rank, worker) alone, with no communication.
A consumer's place is (view index, k): it has taken the first k items of its slice of that view.

A rescale (new C) turns every view into a smaller one holding exactly the positions no
consumer has taken yet (``View.without``); the new consumers then start at (0, 0). Views
past the listed ones are fresh epochs (frontier 0, no holes).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class View:
    """The untaken positions of one epoch of a dataset of ``n`` documents."""

    epoch: int
    n: int
    frontier: int = 0
    holes: tuple[int, ...] = ()  # sorted taken positions above the frontier

    def __post_init__(self) -> None:
        # g[j] = untaken positions before holes[j]: R index -> position by one bisect.
        gaps = tuple(h - self.frontier - j for j, h in enumerate(self.holes))
        object.__setattr__(self, "_gaps", gaps)

    def __len__(self) -> int:
        return self.n - self.frontier - len(self.holes)

    def position(self, i: int) -> int:
        """R[i]: the i-th untaken position."""
        if not 0 <= i < len(self):
            raise IndexError(f"view index {i} outside {len(self)}")
        return self.frontier + i + bisect.bisect_right(self._gaps, i)

    def share(self, c: int, consumers: int) -> int:
        """How many items consumer c of ``consumers`` takes from this view."""
        size = len(self)
        return (size - c + consumers - 1) // consumers if size > c else 0

    def without(self, taken: Sequence[int]) -> View:
        """The view left after consumer c took its first ``taken[c]`` items."""
        consumers, size = len(taken), len(self)
        first_free = min([c + k * consumers for c, k in enumerate(taken)] + [size])
        if first_free >= size:
            return View(self.epoch, self.n, self.n)
        ahead = []  # R indices above first_free that some consumer already took
        for c, k in enumerate(taken):
            j0 = max(0, -(-(first_free + 1 - c) // consumers))
            ahead.extend(c + j * consumers for j in range(j0, k))
        frontier = self.position(first_free)
        holes = {h for h in self.holes if h > frontier} | {self.position(i) for i in ahead}
        return View(self.epoch, self.n, frontier, tuple(sorted(holes)))

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "n": self.n, "frontier": self.frontier,
                "holes": list(self.holes)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> View:
        return cls(int(d["epoch"]), int(d["n"]), int(d["frontier"]), tuple(map(int, d["holes"])))


def view_at(views: Sequence[View], index: int) -> View:
    """Views past the listed ones are fresh epochs following the last listed one."""
    if index < len(views):
        return views[index]
    last = views[-1]
    return View(last.epoch + index - len(views) + 1, last.n)


def rescale_views(views: Sequence[View], places: Sequence[tuple[int, int]]) -> list[View]:
    """New views holding exactly what consumers at ``places`` (one per old consumer) left."""
    consumers = len(places)
    first = min(v for v, _ in places)
    last = max([v for v, _ in places] + [len(views) - 1])
    out: list[View] = []
    for index in range(first, last + 1):
        view = view_at(views, index)
        taken = [view.share(c, consumers) if v > index else (k if v == index else 0)
                 for c, (v, k) in enumerate(places)]
        left = view.without(taken)
        if len(left) > 0 or index == last:  # the last one stays: fresh epochs follow it
            out.append(left)
    return out
