"""The evaluations' PNGs: one line chart each, written atomically; matplotlib (the ``demo``
extra) is imported only here, when a plot is drawn."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Series = tuple[str, Sequence[float], Sequence[float | None]]  # (label, x, y)


def line_plot(path: str | os.PathLike, series: Sequence[Series], *, xlabel: str, ylabel: str,
              title: str, log2_x: bool = False, ylim: tuple[float, float] | None = None
              ) -> Path | None:
    """Draw one line per (label, x, y) and save it to ``path``; None (and a warning) if
    matplotlib is not installed. Points whose y is None are left out."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed, so no %s (pip install 'bamba[demo]')",
                    Path(path).name)
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, xs, ys in series:
        points = [(x, y) for x, y in zip(xs, ys) if y is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    if log2_x:  # ticks at the lengths measured, written out
        ax.set_xscale("log", base=2)
        ticks = sorted({x for _, xs, _ in series for x in xs})
        ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
        ax.minorticks_off()
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return _save(fig, plt, Path(path))


def _save(fig: Any, plt: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
