"""GGUF files in: a ``granitehybrid`` (Bamba) or ``llama`` model from its metadata and tensors,
and its tokenizer from the ``tokenizer.ggml.*`` keys.

Tensors stored as F32, F16, BF16, llama.cpp's legacy blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) or
its K-quants (Q2_K to Q6_K: a Q4_0 file's output tensor is Q6_K, a Q4_K_M file's are Q4_K and
Q6_K) and the 4-bit non-linear IQ4_NL and IQ4_XS load: linears and token tables in all of these
but Q2_K and Q3_K stay in their blocks (IQ4's as int8 values of its 16 levels)
(``bamba.gguf.quantized``, ``load_gguf_model``), everything else is dequantized
(``gguf.quants``) into the dtype asked for. Every key and tensor header is checked
against the configuration the metadata describes before any weight loads, so a file of another
architecture, a truncated file, or a tensor set or shape the metadata does not predict fails
with one line naming it.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bamba.config import GRANITE, BambaConfig
from bamba.generation_defaults import GGUF_SAMPLING_KEYS, GenerationDefaults
from bamba.gguf.layout import (ARCHITECTURES, CHUNK_KEY, HYBRID_ARCH, LLAMA_ARCH, ROTARY_KEY,
                               from_gguf, gguf_shape, piece_shape, pieces)
from bamba.gguf.vocab import SPLITS, GGUFVocab, tokenizer_from
from bamba.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MAGIC = b"GGUF"
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K",
                "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")


def is_gguf(path: str | os.PathLike) -> bool:
    """A path named ``*.gguf``, or an existing file that starts with the GGUF magic."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        return True
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


@dataclass
class GGUFModel:
    """An opened GGUF file and the configuration its metadata describes."""

    path: Path
    reader: Any  # gguf.GGUFReader
    config: BambaConfig
    interleaved: int  # leading q/k channels of each head stored as pairs

    def value(self, key: str, default: Any = None) -> Any:
        return field_value(self.reader, key, default)


@functools.cache
def _fast_reader() -> type:
    """``gguf.GGUFReader`` reading its fields through a plain ndarray view of the file's map:
    its reads slice the ``np.memmap`` itself, a memmap object for each element of an array
    field, which for a 100K-token vocabulary (tokens, types, merges: 300K reads) took ~5 s."""
    import numpy as np
    from gguf import GGUFReader

    class Reader(GGUFReader):
        def _get(self, offset: int, dtype: Any, count: int = 1,
                 override_order: str | None = None) -> Any:
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
            count = int(count)
            values = plain[offset:offset + np.dtype(dtype).itemsize * count].view(dtype)[:count]
            order = self.byte_order if override_order is None else override_order
            return values.view(values.dtype.newbyteorder(order))
    return Reader


def open_gguf(path: str | os.PathLike) -> Any:
    """A ``gguf.GGUFReader`` over ``path``; ValueError when it is not a whole GGUF file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        if f.read(4) != MAGIC:
            raise ValueError(f"{path}: not a GGUF file (no GGUF magic)")
    try:
        reader = _fast_reader()(path, "r")
    except Exception as exc:  # the parser raises whatever numpy raises on short reads
        raise ValueError(f"{path}: truncated or corrupt GGUF file "
                         f"({type(exc).__name__}: {exc})") from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise ValueError(f"{path}: truncated: tensor {tensor.name} ends at byte "
                             f"{tensor.data_offset + tensor.n_bytes}, the file has {size}")
    return reader


def architecture(reader: Any, path: Path) -> str:
    """``general.architecture``; ValueError unless it is one bamba runs."""
    arch = field_value(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: architecture {arch!r} is not one bamba runs "
                         f"({', '.join(ARCHITECTURES)})")
    return arch


def field_value(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _required(reader: Any, path: Path, key: str) -> Any:
    value = field_value(reader, key)
    if value is None:
        raise ValueError(f"{path}: metadata key {key} is missing")
    return value


def generation_defaults(model_file: GGUFModel) -> GenerationDefaults:
    """llama.cpp's ``general.sampling.*`` keys as sampling defaults, and its end-of-turn and
    end-of-message tokens as ids to stop at (llama.cpp ends generation at them)."""
    data: dict[str, Any] = {ours: model_file.value(key) for ours, key in GGUF_SAMPLING_KEYS.items()}
    stops = (model_file.value(f"tokenizer.ggml.{kind}_token_id") for kind in ("eot", "eom"))
    data["eos_token_id"] = [t for t in stops if t is not None]
    return GenerationDefaults.from_dict(data, str(model_file.path))


def read_model_file(path: str | os.PathLike) -> GGUFModel:
    """Open ``path`` and derive its configuration (ValueError naming what does not fit)."""
    path = Path(path)
    reader = open_gguf(path)
    arch = architecture(reader, path)
    try:
        config, interleaved = _config(reader, path, arch)
    except (TypeError, ValueError, ArithmeticError) as exc:  # metadata of the wrong kind or size
        text = str(exc)
        raise ValueError(text if text.startswith(str(path)) else f"{path}: {text}") from None
    return GGUFModel(path, reader, config, interleaved)


def _config(reader: Any, path: Path, arch: str) -> tuple[BambaConfig, int]:
    def key(name: str, default: Any = None, required: bool = True) -> Any:
        full = f"{arch}.{name}"
        return _required(reader, path, full) if required and default is None \
            else field_value(reader, full, default)

    names = {t.name for t in reader.tensors}
    hidden, heads, layers = key("embedding_length"), key("attention.head_count"), key("block_count")
    head_dim = key("attention.key_length", hidden // max(heads, 1))
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError(f"{arch}.attention: a head length of {head_dim!r} (embedding_length "
                         f"{hidden}, head_count {heads})")
    kv = key("attention.head_count_kv", heads)
    vocab = key("vocab_size", 0, required=False) or len(field_value(
        reader, "tokenizer.ggml.tokens", [])) or _rows(reader, "token_embd.weight", path)
    fields: dict[str, Any] = dict(
        model_type="llama" if arch == LLAMA_ARCH else "bamba", vocab_size=vocab,
        hidden_size=hidden, intermediate_size=key("feed_forward_length"),
        num_hidden_layers=layers, num_attention_heads=heads, head_dim=head_dim,
        rms_norm_eps=_decimal(key("attention.layer_norm_rms_epsilon")),
        rope_theta=_decimal(key("rope.freq_base", 10000.0)),
        max_position_embeddings=key("context_length"),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=field_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=field_value(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=field_value(reader, "tokenizer.ggml.padding_token_id"))
    if arch == LLAMA_ARCH:  # no Mamba layers: unused Mamba sizes kept consistent, as config.json's
        kv_heads, first_attention = kv, 0
        d_head = math.gcd(2 * hidden, 64)
        fields.update(mamba_expand=2, mamba_d_head=d_head, mamba_n_heads=2 * hidden // d_head)
    else:
        fields.update(_granite_settings(reader, arch, head_dim, key))
        kv_heads, first_attention = _hybrid_fields(fields, key, names, kv)
        fields["mamba_chunk_size"] = field_value(reader, CHUNK_KEY, 256)
    rope_dims, interleaved = _rotary(arch, key("rope.dimension_count", head_dim),
                                     field_value(reader, ROTARY_KEY), head_dim)
    probe = "" if first_attention is None else f"blk.{first_attention}.attn_q.bias"
    fields.update(num_key_value_heads=kv_heads, partial_rotary_factor=rope_dims / head_dim,
                  attention_bias=probe in names, mlp_bias="blk.0.ffn_gate.bias" in names)
    return BambaConfig(**fields), interleaved


def _hybrid_fields(fields: dict[str, Any], key: Any, names: set[str], kv: Any
                   ) -> tuple[int, int | None]:
    """Add a granitehybrid file's layer types and Mamba sizes to ``fields``; returns (KV heads,
    first attention layer or None)."""
    layers, hidden = fields["num_hidden_layers"], fields["hidden_size"]
    kv_list = kv if isinstance(kv, list) else [kv] * layers
    if len(kv_list) != layers:
        raise ValueError(f"{HYBRID_ARCH}.attention.head_count_kv has {len(kv_list)} entries "
                         f"for {layers} blocks")
    attention = [i for i, n in enumerate(kv_list) if n]
    if len({kv_list[i] for i in attention}) > 1:
        raise ValueError(f"{HYBRID_ARCH}.attention.head_count_kv differs between attention "
                         "layers")
    inner, n_heads = key("ssm.inner_size"), key("ssm.time_step_rank")
    if not hidden or inner % hidden:
        raise ValueError(f"{HYBRID_ARCH}.ssm.inner_size {inner} is not a multiple of the "
                         f"embedding length {hidden}")
    fields.update(
        attn_layer_indices=attention, mamba_n_heads=n_heads,
        mamba_d_head=inner // max(n_heads, 1), mamba_expand=inner // hidden,
        mamba_n_groups=key("ssm.group_count"), mamba_d_state=key("ssm.state_size"),
        mamba_d_conv=key("ssm.conv_kernel"),
        mamba_conv_bias=any(n.endswith("ssm_conv1d.bias") for n in names))
    return (kv_list[attention[0]], attention[0]) if attention else (fields["num_attention_heads"],
                                                                   None)


def _rotary(arch: str, rope_dims: int, interleaved: int | None, head_dim: int
            ) -> tuple[int, int]:
    """(rotary width, leading q/k channels stored interleaved) of a file."""
    if interleaved is not None:  # ours
        if interleaved != rope_dims:
            raise ValueError(f"{ROTARY_KEY} {interleaved} differs from "
                             f"{arch}.rope.dimension_count {rope_dims}")
        return rope_dims, interleaved
    # written by llama.cpp's converter: whole heads interleaved
    if arch == HYBRID_ARCH:  # transformers' Bamba rotates half of each head, whatever n_rot says
        return head_dim // 2, head_dim
    if rope_dims != head_dim:
        raise ValueError(f"{arch}.rope.dimension_count {rope_dims} < head size {head_dim} with "
                         "whole heads interleaved has no bamba equivalent")
    return rope_dims, head_dim


def _decimal(value: float) -> float:
    """A float32 metadata value as the shortest decimal that reads back to it (1e-05, not
    9.999999747378752e-06): the number the writer was given."""
    import numpy as np

    return float(str(np.float32(value)))


def _granite_settings(reader: Any, arch: str, head_dim: int, key: Any) -> dict[str, Any]:
    """A granitehybrid file's Granite 4.0 settings: none for Bamba's (rope on, the scales at
    their identity values or absent, no experts); else a Granite hybrid's multipliers,
    positions (llama.cpp's converter switches rope off for every Granite hybrid) and experts
    (``feed_forward_length`` is then an expert's width, the shared MLP's its own key)."""
    def scale(name: str) -> float:
        value = field_value(reader, f"{arch}.{name}", 0.0)
        return _decimal(value) if value else 1.0  # llama.cpp reads 0 (absent) as 1

    rope = field_value(reader, f"{arch}.rope.scaling.finetuned", True) is not False
    multipliers = {"embedding_multiplier": scale("embedding_scale"),
                   "residual_multiplier": scale("residual_scale"),
                   "logits_scaling": scale("logit_scale")}
    attention = _decimal(field_value(reader, f"{arch}.attention.scale", 0.0) or 0.0)
    identity = not attention or math.isclose(attention, head_dim ** -0.5, rel_tol=1e-6)
    experts = key("expert_count", 0, required=False)
    if rope and identity and set(multipliers.values()) == {1.0} and not experts:
        return {}
    mixture = {} if not experts else {
        "num_local_experts": experts, "num_experts_per_tok": key("expert_used_count"),
        "expert_intermediate_size": key("feed_forward_length"),
        "intermediate_size": key("expert_shared_feed_forward_length")}
    return {"model_type": GRANITE, **multipliers, **mixture,
            "attention_multiplier": attention or None,
            "position_embedding_type": "rope" if rope else "nope"}


def _rows(reader: Any, name: str, path: Path) -> int:
    for tensor in reader.tensors:
        if tensor.name == name:
            return int(tensor.shape[-1])
    raise ValueError(f"{path}: no vocab_size key, tokens or {name} to size the vocabulary")


def _same_layout(shape: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """Equal shapes, or equal but for dimensions of size 1, which leave the elements' order
    alone (llama.cpp's converter writes a one-group Mamba norm as [D], not [1, D])."""
    return shape == expected or [n for n in shape if n != 1] == [n for n in expected if n != 1]


def tensor_plan(model_file: GGUFModel, model: torch.nn.Module) -> dict[str, Part]:
    """GGUF tensor name -> the rows of our tensor it holds; ValueError on a missing,
    unexpected or misshapen tensor."""
    config, path = model_file.config, model_file.path
    expected: dict[str, tuple[Part, tuple[int, ...]]] = {}
    for ours, tensor in model.state_dict(keep_vars=True).items():
        if ours == "lm_head.weight" and config.tie_word_embeddings:
            continue
        shape = tuple(tensor.shape)
        for piece in pieces(ours, shape, config):
            part = piece_shape(shape, piece)
            expected[piece.gguf] = (Part(ours, piece.rows, piece.dim, part == shape),
                                    gguf_shape(ours, part, config))
    found = {t.name: t for t in model_file.reader.tensors}
    where = f"({config.num_hidden_layers} blocks in the metadata)"
    for name, tensor in found.items():
        if name not in expected:
            raise ValueError(f"{path}: unexpected tensor {name} {where}")
        shape = tuple(int(n) for n in reversed(tensor.shape))
        if not _same_layout(shape, expected[name][1]):  # named innermost first, as GGUF's tools do
            raise ValueError(f"{path}: tensor {name} has shape {shape[::-1]}, the metadata "
                             f"gives {expected[name][1][::-1]}")
        if tensor.tensor_type.name not in TENSOR_TYPES:
            raise ValueError(f"{path}: tensor {name} is {tensor.tensor_type.name}; bamba reads "
                             f"{', '.join(TENSOR_TYPES)}")
    missing = [n for n in expected if n not in found]
    if missing:
        raise ValueError(f"{path}: tensor {missing[0]} is missing "
                         f"({len(missing)} missing) {where}")
    return {name: part for name, (part, _) in expected.items()}


@dataclass(frozen=True)
class Part:
    """Where a GGUF tensor goes: the slice ``rows`` of dimension ``dim`` of our tensor
    ``ours`` (``whole``: all of it)."""
    ours: str
    rows: slice
    dim: int
    whole: bool


def dequantized(tensor: Any) -> torch.Tensor:
    """A GGUF tensor as float32 in numpy dimension order."""
    import numpy as np
    from gguf.quants import dequantize

    values = dequantize(np.asarray(tensor.data), tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))  # a copy


def load_vocab(path: str | os.PathLike) -> GGUFVocab:
    """The tokenizer keys of a GGUF file (model ``gpt2`` with a split of ``SPLITS``)."""
    path = Path(path)
    reader = open_gguf(path)
    architecture(reader, path)  # a file of another model fails as such, tokenizer or not
    model = field_value(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{path}: tokenizer model {model!r} is not supported "
                         "(only byte-level BPE, 'gpt2'); pass --tokenizer DIR")
    pre = field_value(reader, "tokenizer.ggml.pre", "default")
    if pre not in SPLITS:
        raise ValueError(f"{path}: pre-tokenizer {pre!r} is not supported (only "
                         f"{', '.join(SPLITS)}); pass --tokenizer DIR")
    tokens = _required(reader, path, "tokenizer.ggml.tokens")
    types = field_value(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    if len(types) != len(tokens):
        raise ValueError(f"{path}: {len(types)} token types for {len(tokens)} tokens")
    special = {name: field_value(reader, f"tokenizer.ggml.{key}_token_id")
               for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"),
                                 ("unk", "unknown"))}
    merges = field_value(reader, "tokenizer.ggml.merges", [])
    return GGUFVocab(list(tokens), list(types), list(merges),
                     {k: v for k, v in special.items() if v is not None},
                     bool(field_value(reader, "tokenizer.ggml.add_bos_token", False)),
                     bool(field_value(reader, "tokenizer.ggml.add_eos_token", False)),
                     field_value(reader, "tokenizer.chat_template"), pre)


def load_gguf_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer a GGUF file carries."""
    try:
        return tokenizer_from(load_vocab(path))
    except ValueError as exc:
        text = str(exc)
        raise ValueError(text if text.startswith(str(path)) else f"{path}: {text}") from None


def load_gguf_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> torch.nn.Module:
    """A ``BambaLM`` from a GGUF file, in eval mode. Linear weights and the token table stored
    in a block type of ``bamba.gguf.quantized.KINDS`` (Q8_0, Q4_0, Q5_0, Q6_K, and Q4_1, Q5_1,
    Q4_K, Q5_K with offsets) load in that type's int8 / int4 format as a ``QuantizedLinear`` /
    ``QuantizedEmbedding``, each tensor in its own; a Granite MoE's stacked experts, each in a
    block type of KINDS, as ``QuantizedExpertWeights`` of that type's format; every other
    tensor is dequantized into ``dtype`` (A_log, D and dt_bias stay float32, as
    ``from_pretrained`` keeps them)."""
    from bamba.arena import WeightArena
    from bamba.budget import check_model_fits
    from bamba.checkpoint import _assign
    from bamba.gguf.quantized import (KINDS, decode_blocks,
                                      is_quantized_buffer, linear_tensors, place_quantized,
                                      place_quantized_experts)
    from bamba.model import FP32_PARAMS, BambaLM

    model_file = read_model_file(path)
    config = model_file.config
    defaults = generation_defaults(model_file)
    with torch.device("meta"):
        model = BambaLM(config)
    model.generation_defaults = defaults
    plan = tensor_plan(model_file, model)
    types = {t.name: t.tensor_type.name for t in model_file.reader.tensors}
    stored: dict[str, set[str]] = {}  # our tensor -> the types of its GGUF pieces
    for name, part in plan.items():
        stored.setdefault(part.ours, set()).add(types[name])
    # Each linear whose pieces are all of one block type of KINDS stays in its blocks, in that
    # type's format; the token table too (llama.cpp's files store it so), an lm_head tied to it
    # reading the same blocks.
    quantized = {ours: next(iter(kinds)) for ours, kinds in stored.items()
                 if len(kinds) == 1 and kinds <= set(KINDS) and
                 (_is_linear_weight(model, ours) or ours == EMBEDDINGS)}
    if set(quantized) == {EMBEDDINGS}:  # a dense file's table: dense as well
        quantized = {}
    # A Granite MoE's stacked experts stay in their blocks too (each in one type of KINDS).
    experts = {ours: next(iter(kinds)) for ours, kinds in stored.items()
               if len(kinds) == 1 and kinds <= set(KINDS) and _is_expert_weight(model, ours)}
    check_model_fits(config, dtype.itemsize, quantized_bits=8 if quantized else None)
    if experts:
        with torch.device("meta"):
            place_quantized_experts(model, experts)
    if quantized:
        with torch.device("meta"):
            place_quantized(model, quantized, dtype, experts)
            if config.tie_word_embeddings:
                model.tie_weights()

    def target(name: str, tensor: torch.Tensor) -> torch.dtype:
        if is_quantized_buffer(name):
            return tensor.dtype
        return torch.float32 if name.rsplit(".", 1)[-1] in FP32_PARAMS else dtype

    arena = WeightArena.for_model(model, target) if torch.device(device).type == "cpu" else None
    shapes = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}

    def load(name: str, value: torch.Tensor) -> None:
        _assign(model, name, arena.place(name, value) if arena is not None else
                value.to(device=device, dtype=target(name, value)))

    pending: dict[str, list[tuple[int, tuple[torch.Tensor, ...]]]] = {}
    piece_counts = Counter(part.ours for part in plan.values())

    def whole(part: Part, values: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
        """The values of ``part``'s tensor once every piece of it has been read (rows in
        order: a fused gate-and-up linear's two halves), else None."""
        if part.whole:
            return values
        seen = pending.setdefault(part.ours, [])
        seen.append((part.rows.start, values))
        if len(seen) < piece_counts[part.ours]:
            return None
        seen.sort(key=lambda item: item[0])
        del pending[part.ours]
        return tuple(None if column[0] is None else torch.cat(column, dim=part.dim)
                     for column in zip(*(v for _, v in seen)))

    for tensor in model_file.reader.tensors:
        part = plan[tensor.name]
        ours = part.ours
        if ours in experts:  # [E, rows, cols] in blocks: pieces join on rows, then one matrix
            *lead, cols = (int(n) for n in reversed(tensor.shape))
            blocks = decode_blocks(tensor.data, experts[ours], math.prod(lead), cols)
            values = whole(part, tuple(None if t is None else t.view(*lead, -1) for t in blocks))
            if values is not None:
                module = ours.removesuffix(".weight")
                q, scale, offset = (None if t is None else t.reshape(-1, t.shape[-1])
                                    for t in values)
                for buffer, value in linear_tensors(q, scale, experts[ours], offset).items():
                    load(f"{module}.{buffer}", value)
            continue
        if ours not in quantized:
            value = from_gguf(ours, dequantized(tensor), config, model_file.interleaved)
            values = whole(part, (value,))
            if values is not None:
                load(ours, values[0].reshape(shapes[ours]))
            continue
        rows, cols = (int(n) for n in reversed(tensor.shape))
        blocks = decode_blocks(tensor.data, quantized[ours], rows, cols)
        values = whole(part, tuple(None if t is None else
                                   from_gguf(ours, t, config, model_file.interleaved)
                                   for t in blocks))
        if values is None:
            continue
        module = ours.removesuffix(".weight")
        q, scale, offset = values
        for buffer, value in linear_tensors(q, scale, quantized[ours], offset).items():
            load(f"{module}.{buffer}", value)
    if config.tie_word_embeddings:
        model.tie_weights()
    log.info("loaded %s (%s, %d tensors, dtype %s%s)", model_file.path,
             model_file.value("general.architecture"), len(plan), dtype,
             f", {len(quantized)} matrices {'/'.join(sorted(set(quantized.values())))}"
             if quantized else "")
    return model.eval()


EMBEDDINGS = "model.embed_tokens.weight"


def _is_expert_weight(model: torch.nn.Module, name: str) -> bool:
    module, _, leaf = name.rpartition(".")
    return leaf == "weight" and hasattr(model.get_submodule(module), "expert")


def _is_linear_weight(model: torch.nn.Module, name: str) -> bool:
    module, _, leaf = name.rpartition(".")
    return leaf == "weight" and isinstance(model.get_submodule(module), torch.nn.Linear)
