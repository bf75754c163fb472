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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from bamba.arena import WeightArena
from bamba.budget import check_model_fits
from bamba.config import BambaConfig, with_rope_scaling
from bamba.checkpoint_writer import (CONFIG_NAME, GENERATION_CONFIG_NAME, INDEX_NAME,  # noqa: F401
                                     SHARD_PATTERN, TIED_HEAD, WEIGHTS_NAME, export_state_dict,
                                     hf_config_dict, parse_size, save_pretrained,
                                     to_bamba_name, to_checkpoint_name, write_checkpoint)
from bamba.generation_defaults import read_generation_defaults
from bamba.model import FP32_PARAMS, BambaLM
from bamba.quant.apply import place_empty, place_stored_experts
from bamba.quant.config import QuantConfig, parse_quantization_config
from bamba.quant.experts import ExpertPieces, QuantizedExpertWeights, locate_piece, \
    piece_modules
from bamba.quant.weights import QuantizedWeights
from bamba.tokenizer import Tokenizer
from bamba.tokenizer import load_tokenizer as _load_local_tokenizer

log = logging.getLogger(__name__)

# What a hub download fetches: config, weights, tokenizer; never pickles or other formats.
HUB_PATTERNS = (CONFIG_NAME, GENERATION_CONFIG_NAME, "*.safetensors", INDEX_NAME, "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Buffers some checkpoints carry that our model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")
_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                 "F64": torch.float64}
# What a quantized checkpoint holds besides: fp8 weights, packed int words, their shapes.
_QUANTIZED_DTYPES = {torch.float8_e4m3fn: "F8_E4M3", torch.int32: "I32", torch.int64: "I64"}
_ANY_FLOAT = "a floating-point dtype"
# Static activation scales of a compressed-tensors scheme: activations run unquantized here.
_ACTIVATION_SCALES = (".input_scale", ".output_scale")




# ---- locating a checkpoint --------------------------------------------------------------------
def resolve_checkpoint(path_or_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local checkpoint directory; a hub id ("org/name") is downloaded (or found in the cache)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists() and _is_gguf(path):
        raise ValueError(f"{path}: a GGUF file, where this needs a checkpoint directory (or a "
                         f"hub id)")
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


def config_of(path_or_id: str | os.PathLike) -> BambaConfig:
    """The BambaConfig of a checkpoint (directory or hub id) or of a GGUF file, without its
    weights."""
    if _is_gguf(path_or_id):
        from bamba.gguf.reader import read_model_file

        return read_model_file(path_or_id).config
    return load_config(resolve_checkpoint(path_or_id))


def load_config(directory: str | os.PathLike) -> BambaConfig:
    """The BambaConfig of a checkpoint directory (config.json, model_type bamba or llama), or
    of a GGUF file (its metadata's)."""
    if _is_gguf(directory):
        from bamba.gguf.reader import read_model_file

        return read_model_file(directory).config
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config.json not found")
    return BambaConfig.from_json_file(path)


def load_quantization_config(directory: str | os.PathLike) -> QuantConfig | None:
    """config.json's ``quantization_config`` (compressed-tensors), checked; None when absent."""
    path = Path(directory) / CONFIG_NAME
    raw = json.loads(path.read_text())  # valid JSON: load_config read it first
    if raw.get("quantization_config") is None:
        return None
    try:
        return parse_quantization_config(raw["quantization_config"])
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


# ---- reading safetensors headers ----------------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    file: Path
    shape: tuple[int, ...]
    dtype: str


@contextlib.contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
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


def _scan(shards: list[Path], weight_map: dict[str, str] | None,
          quantized: bool = False) -> dict[str, _Entry]:
    """Every tensor's file, shape and dtype, from the headers alone (floating-point only, or
    also the quantized formats' dtypes when ``quantized``: ``_plan`` checks which tensor)."""
    entries: dict[str, _Entry] = {}
    for shard in shards:
        with open_safetensors(shard) as f:
            for key in f.keys():
                if key in entries:
                    raise ValueError(f"{shard}: tensor {key} is also in {entries[key].file.name}")
                piece = f.get_slice(key)
                dtype = piece.get_dtype()
                if dtype not in _FLOAT_DTYPES and not (quantized and dtype in
                                                       _QUANTIZED_DTYPES.values()):
                    raise ValueError(f"{shard}: tensor {key} has dtype {dtype}, "
                                     f"expected a floating-point dtype")
                entries[key] = _Entry(shard, tuple(piece.get_shape()), dtype)
    for key, name in (weight_map or {}).items():
        if key not in entries or entries[key].file.name != name:
            raise ValueError(f"{shards[0].parent / INDEX_NAME}: maps {key} to {name}, "
                             f"which does not hold it")
    return entries


def _plan(model: BambaLM, entries: dict[str, _Entry], where: Path) -> dict[str, str]:
    """checkpoint name -> our name for every tensor to load; raises on any mismatch (names,
    shapes, and the exact dtype of quantized weights: fp8, packed int32, int64 shapes).
    Quantized experts come as per-expert pieces of our stacked tensors (every piece there),
    or as fp8 stacks [E, rows, cols] of our [E * rows, cols] (``bamba.quant.experts``)."""
    config = model.config
    state = model.state_dict(keep_vars=True)
    expected = {k: tuple(v.shape) for k, v in state.items()}
    quantized = getattr(model, "quantization_config", None) is not None
    if config.tie_word_embeddings:  # the head reads the table (a quantized one's tensors too)
        expected = {k: v for k, v in expected.items() if not k.startswith(TIED_HEAD)}
    plan: dict[str, str] = {}
    pieces: dict[str, tuple[set[int], int]] = {}  # ours -> (pieces seen, pieces it takes)
    for key, entry in entries.items():
        piece = locate_piece(key) if quantized else None
        ours = to_bamba_name(key if piece is None else piece[0], config.model_type)
        if key.endswith(_IGNORED_SUFFIXES) or \
                (ours.startswith(TIED_HEAD) and config.tie_word_embeddings) or \
                (quantized and key.endswith(_ACTIVATION_SCALES)):
            continue
        stacked = _stacked_module(model, ours) if ours in expected else None
        count = 0 if piece is None or stacked is None else stacked.experts * piece[2]
        if ours not in expected or (piece is not None and not piece[1] < count):
            raise ValueError(f"{entry.file}: unexpected tensor {key} for this config")
        shape = expected[ours]
        if piece is not None:
            shape = shape if ours.endswith(".weight_shape") else (shape[0] // count, *shape[1:])
            pieces.setdefault(ours, (set(), count))[0].add(piece[1])
        elif _is_expert_stack(stacked, ours, entry.shape):
            shape = entry.shape
        if entry.shape != shape and not (entry.shape == () and shape == (1,)):
            raise ValueError(f"{entry.file}: tensor {key} has shape {list(entry.shape)}, "
                             f"expected {list(shape)}")
        want = _QUANTIZED_DTYPES.get(state[ours].dtype, _ANY_FLOAT)
        if (_ANY_FLOAT if entry.dtype in _FLOAT_DTYPES else entry.dtype) != want:
            raise ValueError(f"{entry.file}: tensor {key} has dtype {entry.dtype}, "
                             f"expected {want}")
        plan[key] = ours
    incomplete = {ours: seen for ours, (seen, count) in pieces.items() if len(seen) < count}
    missing = sorted(set(expected) - set(plan.values()))
    if missing or incomplete:
        names = [to_checkpoint_name(m, config.model_type) for m in missing] + \
            [name for ours, seen in incomplete.items()
             for name in _piece_names(model, ours, exclude=seen)]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise ValueError(f"{where}: missing tensors {shown}")
    return plan


def _stacked_module(model: nn.Module, ours: str) -> QuantizedExpertWeights | None:
    """The quantized experts our tensor ``ours`` belongs to, if it does."""
    module = model.get_submodule(ours.rpartition(".")[0])
    return module if isinstance(module, QuantizedExpertWeights) else None


def _piece_names(model: BambaLM, ours: str, exclude: set[int] = frozenset()) -> list[str]:
    """The checkpoint names of the per-expert pieces of our stacked tensor ``ours``."""
    module, _, leaf = ours.rpartition(".")
    stacked = to_checkpoint_name(module, model.config.model_type)
    return [f"{name}.{leaf}" for i, name in
            enumerate(piece_modules(stacked, model.get_submodule(module).experts))
            if i not in exclude]


def _is_expert_stack(stacked: QuantizedExpertWeights | None, ours: str,
                     shape: tuple[int, ...]) -> bool:
    """Whether ``shape`` is our quantized experts' tensor ``ours`` [E * rows, cols] stored
    as [E, rows, cols]."""
    if stacked is None or ours.endswith(".weight_shape") or len(shape) != 3:
        return False
    held = tuple(getattr(stacked, ours.rpartition(".")[2]).shape)
    return shape[0] == stacked.experts and (shape[0] * shape[1], shape[2]) == held


def checked_tensors(directory: Path, model: BambaLM) -> tuple[dict[str, Path], dict[str, str]]:
    """For every tensor to load into ``model`` (built on meta from the checkpoint's config):
    checkpoint name -> its file, and checkpoint name -> our name; every header checked first."""
    shards, weight_map = _shard_files(directory)
    entries = _scan(shards, weight_map, getattr(model, "quantization_config", None) is not None)
    plan = _plan(model, entries, shards[0] if weight_map is None else directory / INDEX_NAME)
    return {key: entries[key].file for key in plan}, plan


def tensor_reader(path_or_id: str | os.PathLike, revision: str | None = None
                  ) -> tuple[BambaLM, Callable[[str], torch.Tensor]] | None:
    """A dense safetensors checkpoint without loading it: its model on the meta device and
    ``tensor(our name)``, which reads that one tensor from its file as stored (every header
    checked first). None for a GGUF file or a quantized checkpoint."""
    if _is_gguf(path_or_id):
        return None
    directory = resolve_checkpoint(path_or_id, revision)
    if load_quantization_config(directory) is not None:
        return None
    with torch.device("meta"):
        model = BambaLM(load_config(directory))
    model.generation_defaults = read_generation_defaults(directory)
    files, plan = checked_tensors(directory, model)
    where = {ours: key for key, ours in plan.items()}

    def tensor(ours: str) -> torch.Tensor:
        key = where[ours]
        with open_safetensors(files[key]) as f:
            return f.get_tensor(key)

    return model, tensor


# ---- loading ----------------------------------------------------------------------------------
def from_pretrained(path_or_id: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", revision: str | None = None,
                    rope_scaling: dict[str, Any] | None = None) -> BambaLM:
    """Load a Hugging Face Bamba or Llama checkpoint (local directory or hub id), or a GGUF
    file (``*.gguf`` or GGUF magic; see ``bamba.gguf.reader``), in eval mode; the model's
    ``generation_defaults`` are its generation_config.json's (``bamba.generation_defaults``).

    Floating-point weights are cast to ``dtype`` as they load, except the per-head
    A_log, D and dt_bias, which stay float32 (they feed exp and softplus). ``rope_scaling``
    (a ``rope_parameters`` dict, e.g. ``{"rope_type": "yarn", "factor": 4}``) replaces the
    checkpoint's RoPE scaling.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    if _is_gguf(path_or_id):
        from bamba.gguf.reader import load_gguf_model

        model = load_gguf_model(path_or_id, dtype=dtype, device=device)
        model.config = with_rope_scaling(model.config, rope_scaling)
        return model
    directory = resolve_checkpoint(path_or_id, revision)
    config = with_rope_scaling(load_config(directory), rope_scaling)
    quantization = load_quantization_config(directory)
    generation_defaults = read_generation_defaults(directory)
    check_model_fits(config, dtype.itemsize, quantized_bits=None if quantization is None
                     else min(g.scheme.bits for g in quantization.groups))
    shards, weight_map = _shard_files(directory)
    entries = _scan(shards, weight_map, quantized=quantization is not None)
    with torch.device("meta"):
        model = BambaLM(config)
        if quantization is not None:
            _place_quantized(model, quantization, entries, dtype)
            if config.tie_word_embeddings:  # a quantized table: the head holds its tensors
                model.tie_weights()
    where = shards[0] if weight_map is None else directory / INDEX_NAME
    plan = _plan(model, entries, where)
    keep = _quantized_tensor_names(model)

    def target(name: str, tensor: torch.Tensor) -> torch.dtype:
        if name in keep:  # quantized weights and their scales load as they are stored
            return tensor.dtype
        return torch.float32 if name.rsplit(".", 1)[-1] in FP32_PARAMS else dtype

    state = model.state_dict(keep_vars=True)
    targets = {name: target(name, t) for name, t in state.items()}
    shapes = {name: t.shape for name, t in state.items()}
    # On a CPU the weights load straight into one huge-page buffer (bamba.arena).
    arena = WeightArena.for_model(model, target) if torch.device(device).type == "cpu" else None
    experts = ExpertPieces(model, where)
    for shard in shards:
        with open_safetensors(shard) as f:
            for key in (k for k in f.keys() if k in plan):
                ours, tensor = plan[key], experts.join(key, plan[key], f.get_tensor(key))
                if tensor is None:  # more pieces of it to come
                    continue
                tensor = tensor.reshape(shapes[ours])  # scalars as [1], fp8 expert stacks flat
                _assign(model, ours, arena.place(ours, tensor) if arena is not None else
                        tensor.to(device=device, dtype=targets[ours]))
    if config.tie_word_embeddings:
        model.tie_weights()
    if quantization is not None:
        _check_packed_shapes(model, where)
    # A buffer the model computes at construction (not in state_dict) cannot come from a file.
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"not materialised after loading: {left}"
    model.generation_defaults = generation_defaults
    log.info("loaded %s (%d tensors, %d files, dtype %s)", directory, len(plan), len(shards), dtype)
    return model.eval()


def _place_quantized(model: BambaLM, quantization: QuantConfig, entries: dict[str, _Entry],
                     dtype: torch.dtype) -> None:
    """Empty quantized modules where the config quantizes, scales in the dtype the
    checkpoint stores them in, embeddings giving ``dtype``."""
    model_type = model.config.model_type

    def stored_scale(name: str) -> torch.dtype | None:  # module name as the checkpoint has it
        entry = entries.get(f"{name}.weight_scale")
        return None if entry is None else _FLOAT_DTYPES.get(entry.dtype, dtype)

    rename = partial(to_checkpoint_name, model_type=model_type)
    place_empty(model, quantization, rename, lambda name: stored_scale(rename(name)) or dtype,
                dtype)
    place_stored_experts(model, quantization, rename, stored_scale)
    model.quantization_config = quantization.raw
    log.info("quantized checkpoint: %s, %s", quantization.format,
             ", ".join(sorted({g.scheme.name for g in quantization.groups})))


def _quantized_tensor_names(model: nn.Module) -> set[str]:
    return {f"{name}.{leaf}" for name, module in model.named_modules()
            if isinstance(module, QuantizedWeights) for leaf in module.scheme.tensor_names()}


def _check_packed_shapes(model: BambaLM, where: Path) -> None:
    """Each packed layer's ``weight_shape`` holds the (out, in) its words and scales have."""
    for name, module in model.named_modules():
        if isinstance(module, QuantizedWeights) and module.scheme.packed:
            held = module.weight_shape.tolist()
            if held != list(module.dense_shape):
                key = to_checkpoint_name(f"{name}.weight_shape", model.config.model_type)
                raise ValueError(f"{where}: tensor {key} holds {held}, expected "
                                 f"{list(module.dense_shape)}")


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


