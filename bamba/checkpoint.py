"""Hugging Face checkpoints in: config.json, safetensors (one file or sharded with an
index), generation_config.json, tokenizer files; hub ids through huggingface_hub.

Loading builds the model on the meta device and assigns tensors one at a time straight from
the memory-mapped safetensors files, cast to the target dtype, so two full copies of the weights
never coexist. Every header is read and checked (names, shapes, shard files) before any tensor
is loaded, so a bad checkpoint fails with one line naming the file and nothing half-loads.

Saving lives in ``bamba.checkpoint_writer`` (which the model's ``save_pretrained`` uses without
importing this module); its names are re-exported here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from bamba.arena import WeightArena
from bamba.budget import check_model_fits
from bamba.config import BambaConfig
from bamba.checkpoint_writer import (CONFIG_NAME, GENERATION_CONFIG_NAME, INDEX_NAME,  # noqa: F401
                                     SHARD_PATTERN, WEIGHTS_NAME, export_state_dict,
                                     hf_config_dict, parse_size, save_pretrained,
                                     to_bamba_name, to_checkpoint_name)
from bamba.model import FP32_PARAMS, BambaLM
from bamba.tokenizer import Tokenizer
from bamba.tokenizer import load_tokenizer as _load_local_tokenizer

log = logging.getLogger(__name__)

# What a hub download fetches: config, weights, tokenizer; never pickles or other formats.
HUB_PATTERNS = (CONFIG_NAME, GENERATION_CONFIG_NAME, "*.safetensors", INDEX_NAME, "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Buffers some checkpoints carry that our model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")




# ---- locating a checkpoint --------------------------------------------------------------------
def resolve_checkpoint(path_or_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local checkpoint directory; a hub id ("org/name") is downloaded (or found in the cache)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path}: is a file, expected a checkpoint directory or a GGUF file")
    text = str(path_or_id)
    if not _HUB_ID.fullmatch(text):
        raise FileNotFoundError(f"{text}: no such checkpoint directory")
    return _download(text, revision)


def _is_gguf(path_or_id: str | os.PathLike) -> bool:
    from bamba.gguf.reader import is_gguf

    return is_gguf(path_or_id)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        local = snapshot_download(repo_id, revision=revision, allow_patterns=list(HUB_PATTERNS),
                                  local_files_only=offline)
    except Exception as exc:  # any hub failure (offline, unknown repo, network) -> one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(f"{repo_id}: not a local directory, and fetching it from the hub "
                                f"failed{' (offline)' if offline else ''}: {reason}") from exc
    return Path(local)


def load_config(directory: str | os.PathLike) -> BambaConfig:
    """The BambaConfig of a checkpoint directory (config.json, model_type bamba or llama)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config.json not found")
    return BambaConfig.from_json_file(path)


# ---- reading safetensors headers ----------------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    file: Path
    shape: tuple[int, ...]


@contextlib.contextmanager
def _open(path: Path) -> Iterator[Any]:
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as exc:
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
    with handle as f:
        yield f


def _read_index(index: Path) -> dict[str, str]:
    try:
        raw = json.loads(index.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{index}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: no weight_map of tensor name -> shard file")
    return weight_map


def _shard_files(directory: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files of a checkpoint, and the index's weight map when sharded."""
    index = directory / INDEX_NAME
    if index.is_file():
        weight_map = _read_index(index)
        names = sorted(set(weight_map.values()))
        for name in names:
            if Path(name).name != name:
                raise ValueError(f"{index}: shard name {name!r} is not a plain file name")
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{index}: names shard {name}, which does not exist")
        return [directory / n for n in names], weight_map
    single = directory / WEIGHTS_NAME
    if single.is_file():
        return [single], None
    raise FileNotFoundError(f"{directory}: no {WEIGHTS_NAME} or {INDEX_NAME}")


def _scan(shards: list[Path], weight_map: dict[str, str] | None) -> dict[str, _Entry]:
    """Every tensor's file and shape, from the headers alone."""
    entries: dict[str, _Entry] = {}
    for shard in shards:
        with _open(shard) as f:
            for key in f.keys():
                if key in entries:
                    raise ValueError(f"{shard}: tensor {key} is also in {entries[key].file.name}")
                piece = f.get_slice(key)
                if piece.get_dtype() not in _FLOAT_DTYPES:
                    raise ValueError(f"{shard}: tensor {key} has dtype {piece.get_dtype()}, "
                                     f"expected a floating-point dtype")
                entries[key] = _Entry(shard, tuple(piece.get_shape()))
    for key, name in (weight_map or {}).items():
        if key not in entries or entries[key].file.name != name:
            raise ValueError(f"{shards[0].parent / INDEX_NAME}: maps {key} to {name}, "
                             f"which does not hold it")
    return entries


def _plan(model: BambaLM, entries: dict[str, _Entry], where: Path) -> dict[str, str]:
    """checkpoint name -> our name for every tensor to load; raises on any mismatch."""
    config = model.config
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    plan: dict[str, str] = {}
    for key, entry in entries.items():
        ours = to_bamba_name(key, config.model_type)
        if key.endswith(_IGNORED_SUFFIXES) or (ours == "lm_head.weight" and config.tie_word_embeddings):
            continue
        if ours not in expected:
            raise ValueError(f"{entry.file}: unexpected tensor {key} for this config")
        if entry.shape != expected[ours]:
            raise ValueError(f"{entry.file}: tensor {key} has shape {list(entry.shape)}, "
                             f"expected {list(expected[ours])}")
        plan[key] = ours
    missing = sorted(set(expected) - set(plan.values()))
    if missing:
        names = [to_checkpoint_name(m, config.model_type) for m in missing]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise ValueError(f"{where}: missing tensors {shown}")
    return plan


# ---- loading ----------------------------------------------------------------------------------
def from_pretrained(path_or_id: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", revision: str | None = None) -> BambaLM:
    """Load a Hugging Face Bamba or Llama checkpoint (local directory or hub id), or a GGUF
    file (``*.gguf`` or GGUF magic; see ``bamba.gguf.reader``), in eval mode.

    Floating-point weights are cast to ``dtype`` as they load, except the per-head
    A_log, D and dt_bias, which stay float32 (they feed exp and softplus).
    """
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    if _is_gguf(path_or_id):
        from bamba.gguf.reader import load_gguf_model

        return load_gguf_model(path_or_id, dtype=dtype, device=device)
    directory = resolve_checkpoint(path_or_id, revision)
    config = load_config(directory)
    check_model_fits(config, dtype.itemsize)
    shards, weight_map = _shard_files(directory)
    entries = _scan(shards, weight_map)
    with torch.device("meta"):
        model = BambaLM(config)
    plan = _plan(model, entries, shards[0] if weight_map is None else directory / INDEX_NAME)

    def target(name: str, tensor: torch.Tensor | None = None) -> torch.dtype:
        return torch.float32 if name.rsplit(".", 1)[-1] in FP32_PARAMS else dtype

    # On a CPU the weights load straight into one huge-page buffer (bamba.arena).
    arena = WeightArena.for_model(model, target) if torch.device(device).type == "cpu" else None
    for shard in shards:
        with _open(shard) as f:
            for key in (k for k in f.keys() if k in plan):
                ours, tensor = plan[key], f.get_tensor(key)
                _assign(model, ours, arena.place(ours, tensor) if arena is not None else
                        tensor.to(device=device, dtype=target(ours)))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # A buffer the model computes at construction (not in state_dict) cannot come from a file.
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"not materialised after loading: {left}"
    log.info("loaded %s (%d tensors, %d files, dtype %s)", directory, len(plan), len(shards), dtype)
    return model.eval()


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(getattr(module, leaf), nn.Parameter):
        setattr(module, leaf, nn.Parameter(tensor, requires_grad=tensor.is_floating_point()))
    else:
        setattr(module, leaf, tensor)


def load_tokenizer(path_or_id: str | os.PathLike, revision: str | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint directory or hub id (see ``bamba.tokenizer``), or the one
    a GGUF file carries."""
    if _is_gguf(path_or_id):
        from bamba.gguf.reader import load_gguf_tokenizer

        return load_gguf_tokenizer(path_or_id)
    return _load_local_tokenizer(resolve_checkpoint(path_or_id, revision))


