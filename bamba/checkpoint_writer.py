"""Hugging Face checkpoints out: config.json, generation_config.json, safetensors (one file, or
shards with an index), the tokenizer's files, and the tensor names both ways.

It needs only the model object it is given (a ``BambaLM``: its ``config``, ``dtype`` and state
dict), never the model's module, so ``BambaLM.save_pretrained`` can use it while ``bamba.checkpoint`` (loading) imports
the model. Saving writes everything into a temporary directory next to the target and moves it
in with ``os.replace``; config.json arrives last, so a crash never leaves a directory that looks
complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from bamba.files import give_plain_modes
from bamba.generation_defaults import GENERATION_CONFIG_NAME
from bamba.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
TIED_HEAD = "lm_head."  # a tied head's tensors: the token table's, never written apart
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# A checkpoint's names <-> ours (ours equal BambaForCausalLM's; a Granite model's MLP keeps
# its fused input_linear and output_linear under our feed_forward, its experts under
# feed_forward.experts). Applied in order, the first match each.
_RENAMES = {
    "llama": ((".mlp.", ".feed_forward."),
              (".post_attention_layernorm.", ".pre_ff_layernorm."),
              ("model.norm.", "model.final_layernorm.")),
    "granitemoehybrid": ((".block_sparse_moe.", ".feed_forward.experts."),
                         (".shared_mlp.", ".feed_forward."),
                         (".post_attention_layernorm.", ".pre_ff_layernorm."),
                         ("model.norm.", "model.final_layernorm.")),
}


# ---- names ------------------------------------------------------------------------------------
def to_bamba_name(name: str, model_type: str) -> str:
    """A checkpoint tensor name as our module path."""
    for theirs, ours in _RENAMES.get(model_type, ()):
        name = name.replace(theirs, ours, 1)
    return name


def to_checkpoint_name(name: str, model_type: str) -> str:
    """Our module path as the tensor name transformers expects for ``model_type``."""
    for theirs, ours in _RENAMES.get(model_type, ()):
        name = name.replace(ours, theirs, 1)
    return name


# ---- saving -----------------------------------------------------------------------------------
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "2GB" (10^9) or "500MiB" (2^20)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"max_shard_size {size!r} is not a size like 2GB, 500MB or 1GiB")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def export_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint-named tensors (tied lm_head written once, as transformers does; quantized
    experts as per-expert linears, ``bamba.quant.experts``)."""
    config = model.config
    for path, module in model.named_modules():
        scheme = getattr(module, "scheme", None)
        if getattr(scheme, "offsets", False):
            raise ValueError(f"this model cannot be saved in the Hugging Face layout: "
                             f"{to_checkpoint_name(path, config.model_type)} holds {scheme.name} "
                             f"weights with float offsets (GGUF Q4_1 / Q5_1 / Q4_K / Q5_K "
                             f"blocks), which compressed-tensors cannot describe; export-gguf "
                             f"writes it, or bamba.quant.apply.dequantize_model makes it dense")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name.startswith(TIED_HEAD) and config.tie_word_embeddings:
            continue
        out[to_checkpoint_name(name, config.model_type)] = tensor.detach().to("cpu").contiguous()
    for path, module in model.named_modules():
        name = to_checkpoint_name(path, config.model_type)
        if hasattr(module, "checkpoint_tensors"):  # quantized experts
            _check_described(model, module, name)
            for leaf in module.scheme.tensor_names():
                del out[f"{name}.{leaf}"]
            out.update(module.checkpoint_tensors(name))
        elif hasattr(module, "saved_tensors") and \
                f"{name}.{module.scheme.tensor_names()[0]}" in out:  # (not a tied head)
            for leaf in module.scheme.tensor_names():  # as saved: Q6_K's table, IQ4's levels
                del out[f"{name}.{leaf}"]
            out.update({f"{name}.{leaf}": t for leaf, t in module.saved_tensors().items()})
    return out


def _check_described(model: nn.Module, experts: nn.Module, stacked: str) -> None:
    """ValueError unless the model's quantization_config gives ``experts`` (saved as
    per-expert linears) the scheme they hold."""
    from bamba.quant.config import parse_quantization_config
    from bamba.quant.experts import piece_modules
    from bamba.quant.formats import saved_scheme

    raw = getattr(model, "quantization_config", None)
    group = None if raw is None else parse_quantization_config(raw).group_for(
        piece_modules(stacked, 1)[0], ("Linear",))
    held = saved_scheme(experts.scheme)  # (a Q6_K table is saved as its scales)
    if group is None or group.scheme != held or group.per_tensor:
        raise ValueError(f"this model cannot be saved in the Hugging Face layout: the experts "
                         f"of {stacked} are quantized as {experts.scheme.name} (group "
                         f"{experts.scheme.group_size}), which its quantization_config does "
                         f"not describe")


class _ShardWriter:
    """Tensors written into safetensors shards as they come: a shard goes to disk once the next
    tensor would take it past ``limit`` bytes (a larger tensor gets a shard of its own), so a
    caller producing tensors one at a time holds about one shard. Named at ``close``:
    model.safetensors when there is one, else model-i-of-n with an index."""

    def __init__(self, directory: Path, limit: int):
        self.directory, self.limit = directory, limit
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0
        self.written: list[tuple[Path, list[str]]] = []  # (file, its tensors)
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.size + nbytes > self.limit:
            self._flush()
        self.pending[name] = tensor
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        path = self.directory / f".shard-{len(self.written):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.written.append((path, list(self.pending)))
        self.pending, self.size = {}, 0

    def close(self) -> None:
        if self.pending or not self.written:
            self._flush()
        if len(self.written) == 1:
            self.written[0][0].rename(self.directory / WEIGHTS_NAME)
            return
        weight_map: dict[str, str] = {}
        for i, (path, names) in enumerate(self.written, 1):
            name = f"model-{i:05d}-of-{len(self.written):05d}.safetensors"
            path.rename(self.directory / name)
            weight_map.update(dict.fromkeys(names, name))
        _write_json(self.directory / INDEX_NAME, {"metadata": {"total_size": self.total},
                                                  "weight_map": weight_map})


def hf_config_dict(model: nn.Module) -> dict[str, Any]:
    """config.json contents: the architecture plus the dtype the weights are stored in."""
    config = model.config
    raw = config.to_hf_dict()
    raw["dtype"] = str(model.dtype).removeprefix("torch.")
    quantization = getattr(model, "quantization_config", None)
    if quantization is not None:
        raw["quantization_config"] = quantization
    if config.model_type == "bamba" and not config.attn_layer_indices:
        raw["use_cache"] = False  # transformers' Bamba cache needs an attention layer
    return raw


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_weights(directory: Path, tensors: Iterable[tuple[str, torch.Tensor]],
                   limit: int) -> None:
    writer = _ShardWriter(directory, limit)
    for name, tensor in tensors:
        writer.add(name, tensor)
    writer.close()


def save_pretrained(model: nn.Module, directory: str | os.PathLike,
                    max_shard_size: int | str = "2GB", tokenizer: Any = None) -> Path:
    """Write a checkpoint transformers' BambaForCausalLM / LlamaForCausalLM loads.

    Files: config.json, generation_config.json, model.safetensors (or shards + index when
    larger than ``max_shard_size``), and the tokenizer's files when one is given. A quantized
    model (``bamba.quant``) is written in the compressed-tensors layout it holds.
    """
    config = model.config
    defaults = model.generation_defaults
    extra_eos = [t for t in defaults.eos_token_ids if t not in config.eos_token_ids]
    eos = config.eos_token_ids + extra_eos if extra_eos else config.eos_token_id
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": eos,
                  "pad_token_id": config.pad_token_id, **defaults.to_dict()}

    def extra_files(staging: Path) -> None:
        _write_json(staging / GENERATION_CONFIG_NAME,
                    {k: v for k, v in generation.items() if v is not None})
        if tokenizer is not None:
            _save_tokenizer(tokenizer, staging)

    return write_checkpoint(directory, export_state_dict(model), hf_config_dict(model),
                            max_shard_size, extra_files)


def write_checkpoint(directory: str | os.PathLike,
                     tensors: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                     config: dict[str, Any], max_shard_size: int | str = "2GB",
                     extra_files: Callable[[Path], None] | None = None) -> Path:
    """Write ``tensors`` (a dict, or (name, tensor) pairs consumed one at a time: each shard is
    written once full, so a generator's tensors need not all be held; safetensors, sharded
    above ``max_shard_size``), whatever ``extra_files(staging)`` adds, and config.json (last)
    into a temporary directory next to ``directory``, then move them in."""
    limit = parse_size(max_shard_size)
    target = Path(directory).expanduser()
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target}: exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_weights(staging, tensors.items() if isinstance(tensors, dict) else tensors,
                       limit)
        if extra_files is not None:
            extra_files(staging)
        _write_json(staging / CONFIG_NAME, config)
        give_plain_modes(staging)  # mkdtemp and safetensors create 0700 / 0600
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("saved %s", target)
    return target


def _save_tokenizer(tokenizer: Any, directory: Path) -> None:
    if isinstance(tokenizer, Tokenizer):
        tokenizer.save(directory)
    elif hasattr(tokenizer, "save_pretrained"):  # a transformers tokenizer
        tokenizer.save_pretrained(str(directory))
    else:
        raise ValueError(f"tokenizer of type {type(tokenizer).__name__} cannot be saved")


def _is_weight_file(name: str) -> bool:
    return name in (WEIGHTS_NAME, INDEX_NAME) or SHARD_PATTERN.fullmatch(name) is not None


def _publish(staging: Path, target: Path) -> None:
    """Move the staged files into ``target``: a rename of the whole directory when it is new;
    otherwise config.json goes first and returns last, and stale weight files are removed."""
    if not target.exists():
        os.replace(staging, target)
        return
    (target / CONFIG_NAME).unlink(missing_ok=True)
    for old in target.iterdir():
        if _is_weight_file(old.name) and not (staging / old.name).exists():
            old.unlink()
    for new in sorted(staging.iterdir(), key=lambda p: p.name == CONFIG_NAME):
        os.replace(new, target / new.name)
