"""``bamba quantize``: a dense checkpoint in, a compressed-tensors one out, tensor by tensor.

The source's tensors are read one at a time from its memory-mapped safetensors files, in
decoder-layer order; each targeted weight (linears, a Granite MoE's experts, and the
embeddings if asked) is quantized as it is read, everything else kept as stored, and handed to
the writer, which writes each output shard (``--max-shard-size``) as soon as it is full: about
one shard is held in memory. The checkpoint is written into a temporary directory and moved
into place.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path

import torch

from bamba.checkpoint import (CONFIG_NAME, GENERATION_CONFIG_NAME, checked_tensors, load_config,
                              open_safetensors, resolve_checkpoint, to_checkpoint_name,
                              write_checkpoint)
from bamba.model import BambaLM
from bamba.quant.apply import head_quantized, targeted_modules
from bamba.quant.config import LM_HEAD, parse_quantization_config, quantization_config_dict
from bamba.quant.experts import quantize_stacked
from bamba.quant.formats import QuantScheme, quantize

log = logging.getLogger(__name__)

# Files a quantized checkpoint keeps from its source, besides config.json and the weights.
COPIED_FILES = (GENERATION_CONFIG_NAME, "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja", "tokenizer.model")
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _units(names: Iterable[str]) -> list[tuple[str, list[str]]]:
    """The tensor names grouped by decoder layer (in layer order), then the rest."""
    layers: dict[int, list[str]] = {}
    rest: list[str] = []
    for name in sorted(names):
        match = _LAYER.match(name)
        (layers.setdefault(int(match.group(1)), []) if match else rest).append(name)
    return [(f"layer {i}", layers[i]) for i in sorted(layers)] + ([("rest", rest)] if rest else [])


def quantize_checkpoint(source: str | os.PathLike, target: str | os.PathLike,
                        scheme: QuantScheme, ignore: Iterable[str] = ("lm_head",),
                        max_shard_size: int | str = "2GB", progress: bool = True,
                        lm_head: QuantScheme | None = None,
                        embedding: QuantScheme | None = None,
                        experts: QuantScheme | None = None) -> Path:
    """Write ``source`` quantized with ``scheme`` to ``target`` (every linear but ``ignore``,
    compressed-tensors matching on checkpoint names; the lm_head, the token embeddings and a
    Granite MoE's experts in schemes of their own when given; a head tied to the embeddings
    is untied when quantized, as llm-compressor does, and stays tied to a quantized table
    when it is not, as llama.cpp's files keep it). ValueError, before anything is
    written, for a source that is already quantized, ``experts`` for a model without them,
    or a group size that does not divide a layer."""
    directory = resolve_checkpoint(source)
    config = load_config(directory)
    raw_config = json.loads((directory / CONFIG_NAME).read_text())
    if raw_config.get("quantization_config") is not None:
        fmt = raw_config["quantization_config"].get("format") \
            if isinstance(raw_config["quantization_config"], dict) else None
        raise ValueError(f"{directory}: is already quantized (quantization_config format "
                         f"{fmt!r}); quantize its dense source instead")
    out_dir = Path(target).expanduser()
    if out_dir.resolve() == directory.resolve():
        raise ValueError(f"{out_dir}: the destination must differ from the source")
    if config.num_local_experts:  # routers stay dense, as llm-compressor's MoE recipes keep them
        ignore = [*ignore, ROUTERS]
    elif experts is not None:
        raise ValueError(f"{directory}: has no experts to quantize apart (not a Granite MoE)")
    quantization = quantization_config_dict(scheme, ignore, lm_head, embedding, experts)
    qconfig = parse_quantization_config(quantization)
    with torch.device("meta"):
        model = BambaLM(config)
    files, plan = checked_tensors(directory, model)
    untie = config.tie_word_embeddings and head_quantized(qconfig, str)
    if untie:  # the head quantized: its own copy of the table, as llm-compressor unties them
        config = config.replace(tie_word_embeddings=False)
        raw_config = {**raw_config, "tie_word_embeddings": False}
        with torch.device("meta"):
            model = BambaLM(config)
        table = next(key for key, ours in plan.items() if ours == EMBEDDINGS)
        files[f"{LM_HEAD}.weight"] = files[table]
    rename = partial(to_checkpoint_name, model_type=config.model_type)
    targets = targeted_modules(model, qconfig, rename, experts=True)
    quantized = {rename(f"{name}.weight"): group.scheme for name, group in targets.items()}
    sources = {f"{LM_HEAD}.weight": table} if untie else {}
    tensors = _convert(files, quantized, progress, sources)  # to the writer, shard by shard
    log.info("quantizing %d layers (%s)", len(quantized),
             ", ".join(sorted({s.name for s in quantized.values()})))

    def copy_files(staging: Path) -> None:
        for name in COPIED_FILES:
            if (directory / name).is_file():
                shutil.copyfile(directory / name, staging / name)

    return write_checkpoint(out_dir, tensors, {**raw_config, "quantization_config": quantization},
                            max_shard_size, copy_files)


ROUTERS = r"re:.*block_sparse_moe\.router$"  # a Granite MoE's expert routers
EMBEDDINGS = "model.embed_tokens.weight"


def _convert(files: dict[str, Path], quantized: dict[str, QuantScheme], progress: bool,
             sources: dict[str, str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of ``files``, one at a time in decoder-layer order (``sources`` names the
    stored tensor one is a copy of: an untied head); the weights ``quantized`` names in their
    schemes (stacked experts [E, rows, cols] as per-expert linears)."""
    from tqdm.auto import tqdm

    for _, names in tqdm(_units(files), unit="layer", disable=not progress, dynamic_ncols=True):
        for name in names:
            with open_safetensors(files[name]) as f:
                tensor = f.get_tensor(sources.get(name, name))
            if name in quantized and tensor.dim() == 3:
                yield from quantize_stacked(name.removesuffix(".weight"), tensor,
                                            quantized[name]).items()
            elif name in quantized:
                prefix = name.removesuffix("weight")
                yield from ((prefix + k, v) for k, v in quantize(tensor, quantized[name]).items())
            else:
                yield name, tensor
