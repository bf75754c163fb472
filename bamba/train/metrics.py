"""Training metrics: FLOPs per token and MFU, a JSONL log, a progress bar, a loss-curve PNG.

FLOPs per token (forward + backward = 3x forward) for a Bamba config at sequence length L:
  * matmuls: 6 * (parameters of every Linear layer, LM head included; embeddings are lookups);
  * attention scores and values, causal (half of the L x L square): 3 * 2 * L * H * d per layer;
  * SSD per Mamba layer (chunk Q, H heads of P, state N): intra-chunk C.B and its product with
    x (causal halves of Q x Q), chunk states and their read-out: 3 * H * (Q * (N + P) + 4 * N * P).
MFU = achieved FLOP/s / the hardware peak given in the config.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bamba.config import BambaConfig

log = logging.getLogger(__name__)


def linear_params(config: BambaConfig) -> int:
    """Parameters of every nn.Linear of the model (counted on the meta device: no memory)."""
    from bamba.model import BambaLM

    with torch.device("meta"):
        model = BambaLM(config)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def flops_per_token(config: BambaConfig, seq_len: int) -> float:
    """Training FLOPs per token (see the module docstring for the terms)."""
    n_attn = len(config.attn_layer_indices)
    n_mamba = config.num_hidden_layers - n_attn
    attention = 3 * 2 * seq_len * config.num_attention_heads * config.head_dim * n_attn
    q = min(config.mamba_chunk_size, seq_len)
    h, p, n = config.mamba_n_heads, config.mamba_d_head, config.mamba_d_state
    ssd = 3 * h * (q * (n + p) + 4 * n * p) * n_mamba
    return 6.0 * linear_params(config) + attention + ssd


def mfu(tokens_per_s: float, flops_token: float, peak_tflops: float) -> float:
    return tokens_per_s * flops_token / (peak_tflops * 1e12)


class MetricsLog:
    """Append-only JSONL, one object per logged step. After a resume, steps after the last
    checkpoint appear twice: readers keep the last line of each step (``read_metrics``)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()


def read_metrics(path: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """step -> the last record written for it."""
    out: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            out[int(record["step"])] = record
    return dict(sorted(out.items()))


def progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


def quiet_logging(enabled: bool) -> contextlib.AbstractContextManager:
    """Route log lines through tqdm while the bar is shown, so they do not break it."""
    if not enabled:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def plot_loss(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> Path | None:
    """Loss against step as a PNG (None if matplotlib, of the ``demo`` extra, is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed, so no %s (pip install 'bamba[demo]')",
                    Path(png_path).name)
        return None
    records = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(list(records), [r["loss"] for r in records.values()])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    png_path = Path(png_path)
    tmp = png_path.with_name(png_path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
