"""Fail fast when a model or a run cannot fit: the memory it needs, estimated from the configs
before anything is allocated (or a module built), against the memory the machine has available.

The estimate is a lower bound (a run that passes may still need more): fp32 weights, their
gradients and AdamW's two moments (16 bytes a parameter, sharded over the processes), plus per
micro-batch the fp32 logits and their gradient and each layer's input kept for the backward
pass. It exists to turn ``num_hidden_layers: 1000000`` or ``batch_size=1000000000`` into one
line instead of a machine swapping for an hour.
"""

from __future__ import annotations

import os
from pathlib import Path

from bamba.config import BambaConfig

BYTES_PER_PARAMETER = 16  # fp32 weight + gradient + AdamW exp_avg + exp_avg_sq
FLOAT_BYTES = 4


def parameter_count(config: BambaConfig) -> int:
    """Parameters of ``BambaLM(config)``, from the sizes alone (one count per layer kind)."""
    from bamba.analyze import layer_params

    per_layer = sum(count * sum(layer_params(config, kind).values())
                    for kind, count in _layer_counts(config).items() if count)
    embeddings = config.vocab_size * config.hidden_size
    head = 0 if config.tie_word_embeddings else embeddings
    return embeddings + head + per_layer + config.hidden_size  # + the final norm


def _layer_counts(config: BambaConfig) -> dict[str, int]:
    n_attention = len(config.attn_layer_indices)
    return {"attention": n_attention, "mamba": config.num_hidden_layers - n_attention}


def activation_bytes(config: BambaConfig, rows: int, seq_len: int) -> int:
    """A lower bound of one micro-batch's activations: logits and their gradient (fp32) and
    every layer's input saved for the backward pass."""
    per_token = 2 * config.vocab_size + config.num_hidden_layers * config.hidden_size
    return rows * seq_len * per_token * FLOAT_BYTES


def available_memory() -> int | None:
    """Bytes this process can still get: MemAvailable, capped by a cgroup v2 limit (None when
    neither is readable)."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit.isdigit():
            found.append(int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def check_memory(config: BambaConfig, rows: int, seq_len: int, world_size: int = 1,
                 local_processes: int = 1, available: int | None = None) -> None:
    """ValueError naming what is too large when this host's processes cannot fit in
    ``available`` bytes (default: ``available_memory()``)."""
    available = available_memory() if available is None else available
    if available is None:
        return
    params = parameter_count(config)
    state = params * BYTES_PER_PARAMETER * local_processes // world_size
    activations = activation_bytes(config, rows, seq_len) * local_processes
    if state + activations <= available:
        return
    if state >= activations:
        culprit = (f"{params:.3g} parameters x {BYTES_PER_PARAMETER} bytes for weights, "
                   f"gradients and AdamW state; num_hidden_layers={config.num_hidden_layers}, "
                   f"hidden_size={config.hidden_size}, vocab_size={config.vocab_size}")
    else:
        culprit = (f"{_size(activations)} of activations for batch_size={rows} x "
                   f"seq_len={seq_len} tokens")
    raise ValueError(f"this run needs at least {_size(state + activations)} of memory "
                     f"({culprit}) but {_size(available)} is available")


def linear_weight_count(config: BambaConfig) -> int:
    """Elements of the linear layers' weight matrices (every layer's and an untied lm_head)."""
    from bamba.analyze import layer_params, matmul_weights

    head = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    return head + sum(count * matmul_weights(layer_params(config, kind))
                      for kind, count in _layer_counts(config).items() if count)


def weight_bytes(config: BambaConfig, bytes_per_parameter: int,
                 quantized_bits: int | None = None) -> int:
    """Bytes of ``BambaLM(config)``'s weights; with ``quantized_bits``, a lower bound for a
    quantized checkpoint: every linear weight and the token table (which ``--embedding`` may
    quantize too) at that width, scales not counted."""
    params = parameter_count(config)
    if quantized_bits is None:
        return params * bytes_per_parameter
    narrow = linear_weight_count(config) + config.vocab_size * config.hidden_size
    return (params - narrow) * bytes_per_parameter + narrow * quantized_bits // 8


def check_model_fits(config: BambaConfig, bytes_per_parameter: int,
                     available: int | None = None, quantized_bits: int | None = None) -> None:
    """ValueError when the weights alone of ``BambaLM(config)`` (linear weights of
    ``quantized_bits`` when given) cannot fit in ``available`` bytes (default:
    ``available_memory()``): a config.json of absurd size fails here, before its modules are
    built."""
    available = available_memory() if available is None else available
    params = parameter_count(config)
    needed = weight_bytes(config, bytes_per_parameter, quantized_bits)
    if available is not None and needed > available:
        raise ValueError(f"config.json describes {params:.3g} parameters "
                         f"(num_hidden_layers={config.num_hidden_layers}, "
                         f"hidden_size={config.hidden_size}, vocab_size={config.vocab_size}): "
                         f"{_size(needed)} of weights, but "
                         f"{_size(available)} of memory is available")


def local_process_count(world_size: int) -> int:
    """Processes of this run on this host (torchrun's LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError("unreachable")
