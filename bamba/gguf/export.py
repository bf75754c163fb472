"""A model (and its tokenizer) as one GGUF file llama.cpp loads: ``granitehybrid`` for a hybrid
or pure-Mamba model (Bamba or a dense Granite 4.0 hybrid), ``llama`` for the all-attention twin;
keys and tensors as llama.cpp's own ``convert_hf_to_gguf.py`` writes them for
``BambaForCausalLM`` / ``GraniteMoeHybridForCausalLM`` / ``LlamaForCausalLM`` (see ``layout``
for the one difference, the rotary channel order).

Tensors are converted and written one at a time after the header (the ``gguf`` writer's
tensor-info-first mode), into a temporary file renamed into place at the end.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from bamba.config import BambaConfig
from bamba.files import plain_mode
from bamba.generation_defaults import GGUF_SAMPLING_KEYS, GenerationDefaults
from bamba.gguf.layout import (CHUNK_KEY, HYBRID_ARCH, LLAMA_ARCH, ROTARY_KEY, Piece,
                               gguf_shape, keeps_float32, piece_shape, pieces, to_gguf)
from bamba.gguf.vocab import vocab_of, write_vocab
from bamba.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FILE_TYPES = ("f32", "bf16", "q8_0", "q4_0")


def check_exportable(config: BambaConfig) -> None:
    """ValueError naming what llama.cpp's architecture for ``config`` cannot express."""
    if config.model_type == "llama":
        return
    if config.mamba_layer_indices and config.mamba_expand != 2:
        raise ValueError(f"llama.cpp's {HYBRID_ARCH} runs mamba_expand 2 only, "
                         f"got {config.mamba_expand}")
    if config.mamba_proj_bias:
        raise ValueError(f"llama.cpp's {HYBRID_ARCH} has no Mamba projection biases "
                         "(mamba_proj_bias is true)")
    if config.time_step_limit != (0.0, math.inf):
        raise ValueError(f"llama.cpp does not clamp the time step: time_step_limit "
                         f"{config.time_step_limit} cannot be exported")


# (GGUFWriter.add_<method>, BambaConfig field)
_COMMON_KEYS = (("block_count", "num_hidden_layers"), ("context_length", "max_position_embeddings"),
                ("embedding_length", "hidden_size"), ("feed_forward_length", "intermediate_size"),
                ("head_count", "num_attention_heads"), ("rope_freq_base", "rope_theta"),
                ("layer_norm_rms_eps", "rms_norm_eps"), ("vocab_size", "vocab_size"),
                ("rope_dimension_count", "rotary_dim"))
_SSM_KEYS = (("ssm_conv_kernel", "mamba_d_conv"), ("ssm_state_size", "mamba_d_state"),
             ("ssm_group_count", "mamba_n_groups"), ("ssm_inner_size", "d_inner"),
             ("ssm_time_step_rank", "mamba_n_heads"))


def _architecture_keys(writer: Any, config: BambaConfig) -> None:
    for method, field in _COMMON_KEYS:
        if field == "intermediate_size" and config.num_local_experts:
            field = "expert_intermediate_size"  # llama.cpp's n_ff: an expert's width
        getattr(writer, f"add_{method}")(getattr(config, field))
    writer.add_uint32(ROTARY_KEY, config.rotary_dim)
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    if writer.arch == LLAMA_ARCH:
        writer.add_head_count_kv(config.num_key_value_heads)
        return
    attention = set(config.attn_layer_indices)
    writer.add_head_count_kv([config.num_key_value_heads if i in attention else 0
                              for i in range(config.num_hidden_layers)])
    for method, field in _SSM_KEYS:
        getattr(writer, f"add_{method}")(getattr(config, field))
    writer.add_uint32(CHUNK_KEY, config.mamba_chunk_size)
    writer.add_rope_scaling_finetuned(config.uses_rope)  # granitehybrid's switch for rope
    # Granite's multipliers (Bamba's are the identity values)
    writer.add_embedding_scale(config.embedding_multiplier)
    writer.add_residual_scale(config.residual_multiplier)
    writer.add_logit_scale(config.logits_scaling)
    writer.add_attention_scale(config.attention_scale)
    if config.num_local_experts:
        writer.add_expert_shared_feed_forward_length(config.intermediate_size)
        writer.add_expert_count(config.num_local_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)


def _generation_keys(writer: Any, defaults: GenerationDefaults, config: BambaConfig) -> None:
    """The checkpoint's sampling defaults as llama.cpp's ``general.sampling.*`` keys, and its
    stop ids beyond the config's EOS as the end-of-turn and end-of-message tokens (llama.cpp
    stops at both; a third is dropped, with a warning)."""
    for ours, key in GGUF_SAMPLING_KEYS.items():
        if ours in defaults.sampling:
            value = defaults.sampling[ours]
            (writer.add_int32 if ours == "top_k" else writer.add_float32)(key, value)
    extra = [t for t in defaults.eos_token_ids if t not in config.eos_token_ids]
    for kind, token in zip(("eot", "eom"), extra):
        getattr(writer, f"add_{kind}_token_id")(token)
    if len(extra) > 2:
        log.warning("GGUF holds two stop ids beside EOS; %s not written", extra[2:])


def _tensor_type(name: str, shape: tuple[int, ...], file_type: str) -> Any:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    wanted = {"f32": Q.F32, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[file_type]
    if wanted == Q.F32 or keeps_float32(name, shape):
        return Q.F32
    if shape[-1] % GGML_QUANT_SIZES[wanted][0]:
        log.info("%s: rows of %d are not whole %s blocks; kept float32", name, shape[-1],
                 wanted.name)
        return Q.F32
    return wanted


def _plan(model: torch.nn.Module) -> Iterator[tuple[str, Piece, str, tuple[int, ...]]]:
    """(our name, the piece of it, GGUF name, GGUF shape) of every tensor to write."""
    config = model.config
    for ours, tensor in model.state_dict().items():
        if ours == "lm_head.weight" and config.tie_word_embeddings:
            continue
        shape = tuple(tensor.shape)
        for piece in pieces(ours, shape, config):
            yield ours, piece, piece.gguf, gguf_shape(ours, piece_shape(shape, piece), config)


StoredInts = Callable[[str], "tuple[torch.Tensor, torch.Tensor, Any] | None"]


def _exact_blocks(found: tuple | None, ours: str, piece: Piece, qtype: Any,
                  config: BambaConfig) -> Any:
    """The Q8_0 / Q4_0 bytes of a weight stored as int8 / int4 (``found``: ``stored_ints``' q,
    scale and scheme), block for block with no second rounding: a scale of a group of 32k
    inputs, or of a whole row, is each of its 32-input blocks' scale; int4 fits either type,
    int8 Q8_0. None when it does not fit (the caller quantizes its values)."""
    from gguf import GGMLQuantizationType as Q

    from bamba.gguf.quantized import GROUP, block_bytes

    if found is None or qtype not in (Q.Q8_0, Q.Q4_0):
        return None
    q, scale, scheme = found
    group = q.shape[-1] // scale.shape[-1]
    if group % GROUP or (qtype == Q.Q4_0 and scheme.bits != 4):
        return None
    scale = scale.repeat_interleave(group // GROUP, dim=-1)
    span = piece.rows.stop - piece.rows.start
    q, scale = (to_gguf(ours, t.narrow(piece.dim, piece.rows.start, span), config)
                for t in (q, scale))  # whole rows: a head's reordering, a fused linear's half
    return block_bytes(q, scale, qtype.name)


def export_gguf(model: torch.nn.Module, tokenizer: Tokenizer, out: str | os.PathLike,
                file_type: str = "bf16", name: str | None = None,
                tensor: Callable[[str], torch.Tensor] | None = None,
                stored: StoredInts | None = None) -> Path:
    """Write ``model`` (a ``BambaLM``) and ``tokenizer`` to ``out`` as GGUF; returns the path.
    ``tensor(our name)`` gives each weight when the model holds none (built on the meta
    device: each is then read, converted and written one at a time); ``stored(our name)``
    (``bamba.quant.apply.stored_ints`` of a quantized source) gives a weight's stored ints,
    which go into Q8_0 / Q4_0 blocks as they are where they fit."""
    import gguf
    import numpy as np

    if file_type not in FILE_TYPES:
        raise ValueError(f"GGUF file type {file_type!r} is not one of {', '.join(FILE_TYPES)}")
    config: BambaConfig = model.config
    if getattr(model, "quantization_config", None) is not None:
        raise ValueError("export_gguf takes a dense model; this one is quantized "
                         "(bamba.quant.apply.dequantize_model turns it dense)")
    check_exportable(config)
    vocab = vocab_of(tokenizer, config.vocab_size)
    if len(vocab.tokens) != config.vocab_size:
        raise ValueError(f"the tokenizer has {len(vocab.tokens)} tokens, more than the model's "
                         f"vocab_size {config.vocab_size}")
    out = Path(out)
    arch = LLAMA_ARCH if config.model_type == "llama" else HYBRID_ARCH
    plan = list(_plan(model))
    types = {g: _tensor_type(g, shape, file_type) for _, _, g, shape in plan}
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type("model")
        writer.add_name(name or out.stem)
        writer.add_file_type(_file_type_id(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _architecture_keys(writer, config)
        write_vocab(writer, vocab)
        _generation_keys(writer, model.generation_defaults, config)
        for _, _, g, shape in plan:
            qtype = types[g]
            nbytes = math.prod(gguf.quant_shape_to_byte_shape(shape, qtype))
            # element shape with raw_dtype: the writer takes it as it is (uint8 would mean bytes)
            writer.add_tensor_info(g, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        if tensor is None:
            state = model.state_dict()
            tensor = state.__getitem__
        exact, found = 0, (None, None)  # (our name, its stored ints): a fused one's pieces share
        for ours, piece, g, _ in plan:
            if stored is not None and found[0] != ours:
                found = (ours, stored(ours))
            raw = None if stored is None else \
                _exact_blocks(found[1], ours, piece, types[g], config)
            if raw is not None:
                exact += 1
                writer.write_tensor_data(raw)
                continue
            value = tensor(ours).detach()
            if value.dim():
                value = value.narrow(piece.dim, piece.rows.start,
                                     piece.rows.stop - piece.rows.start)
            data = to_gguf(ours, value, config)
            data = data.float().contiguous().numpy()
            writer.write_tensor_data(gguf.quants.quantize(data, types[g]))
        writer.close()
        os.chmod(tmp, plain_mode())
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("wrote %s (%s, %s, %d tensors%s)", out, arch, file_type, len(plan),
             f", {exact} of them the source's blocks as stored" if stored is not None else "")
    return out


def _file_type_id(file_type: str) -> int:
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
            "q4_0": F.MOSTLY_Q4_0}[file_type]
