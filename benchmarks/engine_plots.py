"""PNG of the context sub-benchmark: decode throughput vs context, hybrid and twin, per batch,
with the measured and predicted speed-up on a second axis."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_context(section: dict, path: Path) -> None:
    """section: the "context" section of engine.json."""
    points = section["points"]
    batches = sorted({p["batch"] for p in points})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        rows = sorted((p for p in points if p["batch"] == batch), key=lambda p: p["context"])
        ctx = [p["context"] for p in rows]
        for name, style in (("hybrid", "o-"), ("twin", "s-")):
            ax.plot(ctx, [batch / p[name]["step_s"] for p in rows], style, label=f"{name} tok/s")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("decode tok/s (measured)")
        ax.set_title(f"batch {batch}")
        ax.set_yscale("log")
        ratio_ax = ax.twinx()
        ratio_ax.plot(ctx, [p["measured_ratio"] for p in rows], "k-", lw=2, label="measured ratio")
        for key, style in (("exact_state_float32", "r--"), ("exact_state_bfloat16", "m--"),
                           ("appendix", "g:")):
            ratio_ax.plot(ctx, [p["predicted"][key] for p in rows], style, label=f"pred. {key}")
        ratio_ax.axhline(1.0, color="grey", lw=0.5)
        ratio_ax.set_ylabel("hybrid / twin speed-up")
        lines = ax.get_legend_handles_labels()
        more = ratio_ax.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="upper left")
    fig.suptitle(f"decode step cost on a filled cache ({section['path']} path, "
                 f"state {section['state_dtype']}, {section['threads']} threads)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
