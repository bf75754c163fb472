"""GGUF both ways: our export read back gives the same model (identical logits in f32 and bf16,
the same greedy tokens from q8_0 / q4_0), the tokenizer survives as GGUF metadata, files from
llama.cpp's own converter load with the source checkpoint's logits, llama.cpp itself decodes our
export greedily as bamba does (slow), and bad files fail with one line (exit 2 in the CLI)."""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")

from bamba.checkpoint import from_pretrained, load_tokenizer  # noqa: E402
from bamba.cli import main  # noqa: E402
from bamba.gguf.export import export_gguf  # noqa: E402
from bamba.gguf.reader import is_gguf  # noqa: E402
from conftest import (TOKENIZER_TEXTS, build_tokenizer, hf_logits, hf_model, load_hf,
                      random_ids)  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import llama_cpp  # noqa: E402

PROMPT = [5, 17, 42, 99, 150, 201, 7, 64]


@torch.no_grad()
def _greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def _llama_cpp_greedy(path: Path, prompt: list[int], n: int, port: int) -> list[int]:
    """llama.cpp's greedy continuation of ``prompt`` by ``n`` tokens through its server on
    ``path``."""
    import httpx

    server = llama_cpp.start(llama_cpp.find_or_build(), path, port, 2, 1, 256)
    try:
        return httpx.post(f"http://127.0.0.1:{port}/completion", timeout=120, json={
            "prompt": prompt, "n_predict": n, "temperature": 0, "top_k": 1,
            "return_tokens": True, "cache_prompt": False}).json()["tokens"]
    finally:
        server.kill()
        server.wait()


def _types(path: Path) -> set[str]:
    return {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("kind", ["hybrid", "llama", "granite", "granite-rope", "granite-moe"])
def test_f32_round_trip_gives_identical_logits_and_config(make_hf_checkpoint, tmp_path, kind):
    source = make_hf_checkpoint(kind)
    model, tokenizer = from_pretrained(source), load_tokenizer(source)
    out = export_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    arch = gguf.GGUFReader(out).get_field("general.architecture").contents()
    assert arch == ("llama" if kind == "llama" else "granitehybrid")
    back = from_pretrained(out)
    assert back.config == model.config.replace(initializer_range=back.config.initializer_range)
    ids = random_ids(2, 24)
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


def test_bf16_round_trip_gives_identical_logits(make_hf_checkpoint, tmp_path):
    source = make_hf_checkpoint("hybrid")
    model = from_pretrained(source, dtype=torch.bfloat16)
    out = export_gguf(model, load_tokenizer(source), tmp_path / "m.gguf", "bf16")
    assert "BF16" in _types(out)
    back = from_pretrained(out, dtype=torch.bfloat16)
    ids = random_ids(1, 20)
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


@pytest.fixture(scope="module")
def memorised(tmp_path_factory) -> tuple[Path, torch.nn.Module, list[int]]:
    """A checkpoint trained until it continues one token sequence by heart (the greedy margins
    of a trained model, which a random one lacks): (directory, model, sequence). Hidden 64 and
    intermediate 128 make every matrix whole 32-weight blocks."""
    source = tmp_path_factory.mktemp("memorised")
    hf_model("hybrid", hidden_size=64, intermediate_size=128, mamba_d_head=32).save_pretrained(
        source)
    build_tokenizer().save_pretrained(source)
    model, sequence = _memorise(from_pretrained(source))
    return source, model, sequence


def _memorise(model: torch.nn.Module, steps: int = 40) -> tuple[torch.nn.Module, list[int]]:
    """``model`` trained until it continues one random sequence by heart (in eval mode), and
    the sequence."""
    sequence = random_ids(1, 32, seed=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    model.train()
    for _ in range(steps):
        logits = model(sequence[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits[0], sequence[0, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), sequence[0].tolist()


@pytest.mark.parametrize("file_type", ["q8_0", "q4_0"])
def test_quantized_export_keeps_greedy_tokens(memorised, tmp_path, file_type):
    source, model, sequence = memorised
    out = export_gguf(model, load_tokenizer(source), tmp_path / "m.gguf", file_type)
    assert _types(out) == {"F32", file_type.upper()}
    back = from_pretrained(out)
    with torch.no_grad():
        assert not torch.equal(back(torch.tensor([sequence])), model(torch.tensor([sequence])))
    expected = _greedy(model, sequence[:8], 24)
    assert expected[:8] == sequence[8:16]  # it did memorise
    assert _greedy(back, sequence[:8], 24) == expected


@pytest.mark.parametrize("file_type, scheme", [("q8_0", "int8"), ("q4_0", "int4")])
def test_quantized_linears_load_exactly_as_our_int_formats(memorised, tmp_path, file_type,
                                                           scheme):
    """Every Q8_0 / Q4_0 linear becomes a group-32 QuantizedLinear whose weight is exactly what
    gguf.quants dequantizes, and so does the token table a QuantizedEmbedding; save_pretrained
    writes them as compressed-tensors."""
    from bamba.gguf.layout import from_gguf, gguf_name
    from bamba.quant.embedding import QuantizedEmbedding
    from bamba.quant.linear import QuantizedLinear

    source, model, _ = memorised
    out = export_gguf(model, load_tokenizer(source), tmp_path / "m.gguf", file_type)
    back = from_pretrained(out)
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    layers = {n: m for n, m in back.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(layers) == 4 * 3 + 2 * 2 + 2 * 4 + 1  # MLPs, Mamba in/out, attention, head
    for name, layer in layers.items():
        assert layer.scheme.name == scheme and layer.scheme.group_size == 32
        stored = tensors[gguf_name(f"{name}.weight")]
        values = gguf.quants.dequantize(stored.data, stored.tensor_type)
        expected = from_gguf(f"{name}.weight", torch.from_numpy(values.copy()), back.config,
                             back.config.rotary_dim)
        assert torch.equal(layer.dequantized_weight(torch.float32), expected), name
    table = back.model.embed_tokens
    stored = tensors["token_embd.weight"]
    assert stored.tensor_type.name == file_type.upper() and isinstance(table, QuantizedEmbedding)
    assert table.scheme.name == scheme and table.output_dtype == torch.float32
    values = gguf.quants.dequantize(stored.data, stored.tensor_type)
    assert torch.equal(table.dequantized_weight(torch.float32), torch.from_numpy(values.copy()))
    back.save_pretrained(tmp_path / "ct")
    ids = random_ids(1, 16)
    with torch.no_grad():
        assert torch.equal(from_pretrained(tmp_path / "ct")(ids), back(ids))


@pytest.mark.parametrize("file_type", ["q8_0", "q4_0"])
def test_a_tied_token_table_stays_in_its_blocks_once_and_the_head_reads_them(
        make_hf_checkpoint, tmp_path, file_type):
    """A file whose lm_head is the token table (no output.weight: Granite 4.0's) keeps the
    table in its blocks once: the head is a QuantizedLinear holding the same tensors, so the
    model holds no dense copy; its logits are those of the table dequantized and tied, the
    native kernels' too; save_pretrained writes the table once, and both readers tie it again."""
    from bamba.native import accelerate, quant_ops
    from bamba.quant.apply import dequantize_model
    from bamba.quant.embedding import QuantizedEmbedding
    from bamba.quant.linear import QuantizedLinear
    from safetensors import safe_open
    from test_quant_interop import prefill_then_decode

    source = make_hf_checkpoint("granite", hidden_size=64, intermediate_size=128,
                                shared_intermediate_size=128, mamba_d_head=32,
                                tie_word_embeddings=True)
    out = export_gguf(from_pretrained(source), load_tokenizer(source), tmp_path / "m.gguf",
                      file_type)
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(out).tensors}
    back = from_pretrained(out)
    table, head = back.model.embed_tokens, back.lm_head
    assert back.config.tie_word_embeddings and isinstance(table, QuantizedEmbedding)
    assert isinstance(head, QuantizedLinear) and head.dense_shape == table.dense_shape
    for name, tensor in table.quantized_tensors().items():
        assert getattr(head, name) is tensor, name
    names = {n for n, _ in back.named_buffers()}
    assert not any(n.startswith("lm_head.") for n in names)  # held once
    dense = dequantize_model(from_pretrained(out), torch.float32)
    assert dense.lm_head.weight is dense.model.embed_tokens.weight
    ids = random_ids(2, 12)
    previous = quant_ops.set_int8_activations(False)
    try:
        with torch.no_grad():
            logits = back(ids)
            assert torch.allclose(logits, dense(ids), rtol=0, atol=1e-5)
            assert torch.allclose(accelerate(from_pretrained(out))(ids), logits, rtol=0,
                                  atol=1e-5)
            apart = from_pretrained(out)  # the head's tensors copied: what the tie must not change
            apart.lm_head = QuantizedLinear.from_tensors(
                {k: v.clone() for k, v in table.quantized_tensors().items()}, table.scheme)
            decoded = [prefill_then_decode(accelerate(m), ids, prefill=5)
                       for m in (from_pretrained(out), apart)]  # the one-call decode step
            assert torch.equal(*decoded)
    finally:
        quant_ops.set_int8_activations(previous)
    back.save_pretrained(tmp_path / "ct")
    with safe_open(tmp_path / "ct" / "model.safetensors", "pt") as f:
        assert not any(k.startswith("lm_head.") for k in f.keys())
    again = from_pretrained(tmp_path / "ct")
    assert again.lm_head.weight_packed is again.model.embed_tokens.weight_packed
    with torch.no_grad():
        assert torch.equal(again(ids), logits)


@pytest.mark.parametrize("scheme, group, file_type, exact", [
    ("int4", "32", "q4_0", True), ("int4", "64", "q4_0", True), ("int4", "32", "q8_0", True),
    ("int8", "32", "q8_0", True), ("int8", None, "q8_0", True), ("int8", "32", "q4_0", False)])
def test_int_checkpoints_export_their_blocks_as_stored(memorised, tmp_path, scheme, group,
                                                       file_type, exact):
    """`bamba export-gguf` of an int4 / int8 checkpoint (linears in groups of 32 or 64 or per
    row, lm_head and token table: int4 in groups, int8 per row) copies each weight's ints into
    Q4_0 / Q8_0 blocks, each 32 inputs taking their group's or row's scale, with no second
    rounding: the file's weights are the checkpoint's, bit for bit (int4 fits Q8_0 too). int8
    does not fit Q4_0: it is dequantized and quantized again (nearby, not equal)."""
    from bamba.quant.embedding import QuantizedEmbedding
    from bamba.quant.linear import QuantizedLinear

    source, model, sequence = memorised
    bf16 = tmp_path / "bf16"  # bf16 scales, as llm-compressor writes for a bf16 model
    model.to(torch.bfloat16).save_pretrained(bf16)
    for item in source.glob("*token*"):
        shutil.copy(item, bf16)
    model.float()
    quantized = tmp_path / scheme
    assert main(["quantize", str(bf16), str(quantized), "--scheme", scheme, "--lm-head", scheme,
                 "--embedding", scheme, "--no-progress",
                 *(["--group-size", group] if group else [])]) == 0
    out = tmp_path / "m.gguf"
    assert main(["export-gguf", str(quantized), str(out), "--dtype", file_type]) == 0
    assert _types(out) == {"F32", file_type.upper()}
    ours, back = from_pretrained(quantized), from_pretrained(out)
    layers = [n for n, m in ours.named_modules()
              if isinstance(m, (QuantizedLinear, QuantizedEmbedding))]
    assert len(layers) == 4 * 3 + 2 * 2 + 2 * 4 + 2  # MLPs, Mamba in/out, attention, head, table
    same = [torch.equal(back.get_submodule(n).dequantized_weight(torch.float32),
                        ours.get_submodule(n).dequantized_weight(torch.float32)) for n in layers]
    assert all(same) if exact else not any(same), dict(zip(layers, same))
    if exact:
        ids = torch.tensor([sequence])
        with torch.no_grad():
            assert torch.equal(back(ids), ours(ids))


def test_a_zero_point_checkpoint_exports_its_weights_dequantized(memorised, tmp_path):
    """`bamba quantize --asymmetric` weights do not fit Q4_0's symmetric blocks: export-gguf
    dequantizes them ((q - zp) * scale) and quantizes again, so the file's weights are near the
    checkpoint's (copying the ints as stored would drop the zero points)."""
    source, _, sequence = memorised
    quantized, out = tmp_path / "asym", tmp_path / "m.gguf"
    assert main(["quantize", str(source), str(quantized), "--scheme", "int4", "--group-size",
                 "32", "--asymmetric", "--no-progress"]) == 0
    assert main(["export-gguf", str(quantized), str(out), "--dtype", "q4_0"]) == 0
    ours, back = from_pretrained(quantized), from_pretrained(out)
    for name in ("model.layers.0.mamba.in_proj", "model.layers.2.feed_forward.down_proj"):
        want = ours.get_submodule(name).dequantized_weight(torch.float32)
        got = back.get_submodule(name).dequantized_weight(torch.float32)
        assert (got - want).abs().max() <= 0.6 * want.abs().max() / 7, name  # Q4_0's rounding


def _assert_dequantized_as_gguf_does(model: torch.nn.Module, path: Path,
                                     names: list[str]) -> None:
    """Each GGUF tensor ``names`` holds is the model's parameter, as gguf-py dequantizes it:
    bit for bit, but for blocks with minimums (Q4_1, Q5_1, Q4_K, Q5_K), which come out of
    q * scale + offset with the offset rounded to float32 once more: within float32 rounding
    of the tensor's largest weight."""
    from bamba.gguf.layout import from_gguf
    from bamba.gguf.reader import TENSOR_TYPES, read_model_file, tensor_plan
    from bamba.quant.apply import dense_tensor

    from bamba.model import BambaLM

    file = read_model_file(path)
    with torch.device("meta"):
        plan = tensor_plan(file, BambaLM(model.config))  # GGUF name -> rows of our tensor
    for tensor in file.reader.tensors:
        if tensor.name not in names:
            continue
        assert tensor.tensor_type.name in TENSOR_TYPES
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        part = plan[tensor.name]
        expected = from_gguf(part.ours, torch.from_numpy(values.copy()), model.config,
                             file.interleaved)
        held = dense_tensor(model, part.ours, torch.float32).narrow(
            part.dim, part.rows.start, part.rows.stop - part.rows.start)
        minimums = tensor.tensor_type.name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K")
        torch.testing.assert_close(held, expected, rtol=0, atol=2 ** -22 * expected.abs().max()
                                   if minimums else 0, msg=tensor.name)


@pytest.mark.parametrize("kind", ["granite", "granite-moe"])
@pytest.mark.parametrize("file_type, scheme", [("q8_0", "int8"), ("q4_0", "int4")])
def test_granite_fused_gate_and_up_travel_as_two_tensors(make_hf_checkpoint, tmp_path,
                                                         file_type, scheme, kind):
    """A Granite model's fused gate-and-up linear is ffn_gate and ffn_up in the file (as
    llama.cpp's converter splits it); read back, the two halves are one QuantizedLinear again,
    exactly the blocks gguf.quants dequantizes, and the model gives the logits of those
    weights."""
    import numpy as np

    from bamba.quant.apply import dequantize_model
    from bamba.quant.linear import QuantizedLinear

    source = make_hf_checkpoint(kind, hidden_size=64, intermediate_size=64,
                                shared_intermediate_size=64, mamba_d_head=32)
    model = from_pretrained(source)
    out = export_gguf(model, load_tokenizer(source), tmp_path / "m.gguf", file_type)
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    shared = "_shexp" if kind == "granite-moe" else ""

    def values(name: str) -> np.ndarray:
        return gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type)

    back = from_pretrained(out)
    block = back.model.layers[0].feed_forward
    assert isinstance(block.input_linear, QuantizedLinear) and \
        block.input_linear.scheme.name == scheme
    halves = [values(f"blk.0.ffn_{n}{shared}.weight") for n in ("gate", "up")]
    assert torch.equal(block.input_linear.dequantized_weight(torch.float32),
                       torch.from_numpy(np.concatenate(halves)))
    if kind == "granite-moe":  # the experts' [E, F, D] halves join on F, still in their
        experts = block.experts  # blocks; the router stays F32
        assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"
        assert type(experts.input_linear).__name__ == "QuantizedExpertWeights"
        assert experts.input_linear.scheme.name == scheme
        assert torch.equal(experts.input_linear.stacked(torch.float32), torch.from_numpy(
            np.concatenate([values(f"blk.0.ffn_{n}_exps.weight") for n in ("gate", "up")],
                           axis=1)))
        assert torch.equal(experts.output_linear.stacked(torch.float32),
                           torch.from_numpy(values("blk.0.ffn_down_exps.weight").copy()))
        back.save_pretrained(tmp_path / "ct")  # compressed-tensors: per-expert linears
        again = from_pretrained(tmp_path / "ct").model.layers[0].feed_forward.experts
        assert torch.equal(again.input_linear.weight_packed, experts.input_linear.weight_packed)
    ids = random_ids(2, 11)
    with torch.no_grad():
        quantized = back(ids)
        assert torch.equal(dequantize_model(back, torch.float32)(ids), quantized)


@pytest.mark.parametrize("file_type", ["q8_0", "q4_0"])
def test_quantized_experts_decode_in_the_native_step_as_the_torch_path(
        make_hf_checkpoint, tmp_path, monkeypatch, file_type):
    """A Granite MoE GGUF's Q8_0 / Q4_0 experts stay in their blocks through the quantized
    kernels (the prefill's products over each picked expert's slice; the one-call decode step
    streams each pick's slice, dequantized in registers), within bf16
    rounding of the torch path, which dequantizes them (bf16 activations on both sides; a wrong
    expert's slice would be off by the logits' own size)."""
    from bamba.cache import ContiguousCache
    from bamba.native import accelerate, decode_ops, quant_ops
    from bamba.quant.experts import QuantizedExpertWeights

    source = make_hf_checkpoint("granite-moe", hidden_size=128, intermediate_size=128,
                                shared_intermediate_size=128, mamba_d_head=64)
    out = export_gguf(from_pretrained(source), load_tokenizer(source), tmp_path / "m.gguf",
                      file_type)
    calls = []
    real = decode_ops.decode_layers
    monkeypatch.setattr(decode_ops, "decode_layers",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = random_ids(2, 17, seed=9)

    @torch.no_grad()
    def logits(model: torch.nn.Module) -> torch.Tensor:
        cache = ContiguousCache(model.config, rows=2, max_len=17, dtype=model.dtype)
        spans = [(0, 11), *((t, t + 1) for t in range(11, 17))]
        return torch.cat([model(ids[:, a:b], positions=torch.arange(a, b).expand(2, b - a),
                                cache=cache).float() for a, b in spans], dim=1)

    def dense_experts(model: torch.nn.Module) -> torch.nn.Module:
        """Every layer's experts replaced by dense ones of the weights negated
        (registrations: the steps must look again)."""
        from bamba.model import ExpertWeights

        for layer in model.model.layers:
            experts = layer.feed_forward.experts
            for name in ("input_linear", "output_linear"):
                held = getattr(experts, name)
                dense = ExpertWeights(held.experts, held.out_features, held.in_features)
                dense.weight = torch.nn.Parameter(-held.stacked(torch.bfloat16),
                                                  requires_grad=False)
                setattr(experts, name, dense)
        return model

    previous = quant_ops.set_int8_activations(False)
    try:
        ref = logits(from_pretrained(out, dtype=torch.bfloat16))
        accelerated = accelerate(from_pretrained(out, dtype=torch.bfloat16))
        with monkeypatch.context() as patch:  # the prefill's expert products: the kernels
            patch.setattr(QuantizedExpertWeights, "expert", None)
            fast = logits(accelerated)
        assert len(calls) == 6
        assert (fast - ref).abs().max() <= 0.05 * ref.abs().max()
        ref = logits(dense_experts(from_pretrained(out, dtype=torch.bfloat16)))
        fast = logits(dense_experts(accelerated))
    finally:
        quant_ops.set_int8_activations(previous)
    assert len(calls) == 12
    assert (fast - ref).abs().max() <= 0.05 * ref.abs().max()


def test_legacy_block_types_beside_q8_0_load_in_formats_of_their_own(memorised, tmp_path,
                                                                      monkeypatch):
    """A file mixing Q8_0 with other llama.cpp block types (here Q5_0 for the output tensor and
    Q4_1 for a Mamba in_proj) loads each linear in its own block type's format, every weight
    as gguf-py dequantizes it: Q5_0 as int8 (symmetric, 5-bit values), Q4_1 as int4 with a
    float offset per block, which no compressed-tensors checkpoint holds (save_pretrained says
    so in one line)."""
    from gguf import GGMLQuantizationType as Q

    from bamba.gguf import export as gguf_export
    from bamba.quant.linear import QuantizedLinear

    other = {"output.weight": Q.Q5_0, "blk.0.ssm_in.weight": Q.Q4_1}
    real = gguf_export._tensor_type
    monkeypatch.setattr(gguf_export, "_tensor_type",
                        lambda name, shape, file_type: other.get(name) or
                        real(name, shape, file_type))
    source, model, _ = memorised
    out = export_gguf(model, load_tokenizer(source), tmp_path / "mixed.gguf", "q8_0")
    assert {"Q5_0", "Q4_1", "Q8_0"} <= _types(out)
    back = from_pretrained(out, dtype=torch.float32)
    formats = {name: (m.scheme.name, m.scheme.group_size, m.scheme.offsets) for name, m in
               [("head", back.lm_head), ("q4_1", back.model.layers[0].mamba.in_proj),
                ("q8_0", back.model.layers[2].mamba.in_proj)]
               if isinstance(m, QuantizedLinear)}
    assert formats == {"head": ("int8", 32, False), "q4_1": ("int4", 32, True),
                       "q8_0": ("int8", 32, False)}
    _assert_dequantized_as_gguf_does(back, out, list(other))
    with pytest.raises(ValueError, match="blk|layers.0.mamba.in_proj.*float offsets"):
        back.save_pretrained(tmp_path / "saved")


def _random_k_blocks(data, qtype, size=1.0):
    """Blocks of K-quant (or IQ4) type ``qtype`` for an array shaped as ``data`` (gguf-py
    cannot make them): random bytes, with small float16 d (and dmin) fields, so every field is
    exercised; ``size`` scales those fields (and so the weights)."""
    import numpy as np

    per_block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(np.abs(data).sum() * 1e3) % 2**32)
    blocks = rng.integers(0, 256, (*data.shape[:-1], data.shape[-1] // per_block, nbytes),
                          dtype=np.uint8)
    halves = [208] if qtype.name == "Q6_K" else [0] if qtype.name.startswith("IQ4") else [0, 2]
    for at in halves:
        values = rng.standard_normal((*blocks.shape[:-1], 1)) * (0.002 if at else 0.004) * size
        blocks[..., at:at + 2] = values.astype(np.float16).view(np.uint8)
    return blocks.reshape(*data.shape[:-1], -1)


def _file_with_random_blocks(tmp_path: Path, monkeypatch, pick, size: float = 1.0,
                            kind: str = "hybrid", **overrides) -> Path:
    """An f32 export of a random ``kind`` checkpoint (hidden 256, Mamba heads of 128: rows of
    whole 256-weight blocks; ``overrides`` to the config) whose tensors ``pick(gguf name,
    shape)`` gives a K-quant or IQ4 type hold random blocks of it (``_random_k_blocks``, their
    fields scaled by ``size``); the others as the export writes them."""
    from bamba.gguf import export as gguf_export

    real_type, real_quantize = gguf_export._tensor_type, gguf.quants.quantize
    monkeypatch.setattr(gguf_export, "_tensor_type", lambda name, shape, file_type:
                        pick(name, shape) or real_type(name, shape, file_type))
    monkeypatch.setattr(gguf.quants, "quantize", lambda data, qtype: _random_k_blocks(
        data, qtype, size) if qtype.name.endswith(("_K", "_XS", "_NL"))
        else real_quantize(data, qtype))
    source = tmp_path / "source"
    hf_model(kind, **{"hidden_size": 256, "intermediate_size": 512, "mamba_d_head": 128,
                      **overrides}).save_pretrained(source)
    build_tokenizer().save_pretrained(source)
    return export_gguf(from_pretrained(source), load_tokenizer(source),
                       tmp_path / "blocks.gguf", "f32")


def test_k_quant_blocks_load_in_their_formats_as_gguf_dequantizes_them(tmp_path, monkeypatch):
    """Q4_K (int4), Q5_K (int8 held in 5 bits) with a float offset per 32 weights and Q6_K (int8
    in groups of 16, held in 6 bits) linears, the token table in Q4_K, load in those formats, their scales in
    two levels as
    stored, every weight as gguf-py dequantizes it; the native kernels give the torch
    reference's logits (prefill, then a token at a time)."""
    from gguf import GGMLQuantizationType as Q

    from bamba.quant.embedding import QuantizedEmbedding
    from bamba.quant.linear import QuantizedLinear

    k_types = {"blk.0.ssm_in.weight": Q.Q4_K, "blk.0.ssm_out.weight": Q.Q5_K,
               "blk.2.ffn_down.weight": Q.Q6_K, "output.weight": Q.Q6_K,
               "token_embd.weight": Q.Q4_K, "blk.3.ffn_up.weight": Q.Q4_K}
    out = _file_with_random_blocks(tmp_path, monkeypatch, lambda name, shape: k_types.get(name))
    assert {"Q4_K", "Q5_K", "Q6_K"} <= _types(out)
    back = from_pretrained(out, dtype=torch.float32)
    held = {name: (m.scheme.name, m.scheme.group_size, m.scheme.offsets, m.scheme.two_level,
                   m.scheme.held_bits)
            for name, m in back.named_modules()
            if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}
    assert held == {"model.layers.0.mamba.in_proj": ("int4", 32, True, True, None),
                    "model.layers.0.mamba.out_proj": ("int8", 32, True, True, 5),
                    "model.layers.2.feed_forward.down_proj": ("int8", 16, False, True, 6),
                    "model.layers.3.feed_forward.up_proj": ("int4", 32, True, True, None),
                    "lm_head": ("int8", 16, False, True, 6),
                    "model.embed_tokens": ("int4", 32, True, True, None)}
    for name, m in back.named_modules():  # the K-quants' scales held as stored, as the
        scheme = getattr(m, "scheme", None)  # kernels read them
        if getattr(scheme, "two_level", False):
            assert m.kernel_weights().scales is m.weight_table, name
            cols = m.dense_shape[1]  # a float32 d (and dmin) a 256 inputs, sc (and m) a group
            halves = 2 if scheme.offsets else 1
            assert m.weight_table.dtype == torch.uint8
            assert m.weight_table.shape[1:] == (halves, 4 * cols // 256 +
                                                cols // scheme.group_size), name
    _assert_dequantized_as_gguf_does(back, out, list(k_types))
    _assert_native_decodes_as_torch(out, back)


def test_q6_k_scales_are_held_in_two_levels_and_saved_as_their_products(tmp_path, monkeypatch):
    """A tied Granite MoE file all in Q6_K (linears, experts, the table the head reads): each
    holds its values in their 6 bits, as the blocks do, and a float32 d per 256 weights and a
    signed sc byte per 16 (6.625 bits a weight, where int8 values under a float32 scale per 16
    took 10), its weights gguf-py's; save_pretrained writes each as int8 values and the float32
    weight_scale d * sc its table stands for (compressed-tensors' int8 in groups of 16), which
    loads back with the same logits, and the native kernels read both alike."""
    from gguf import GGMLQuantizationType as Q
    from safetensors import safe_open

    from bamba.native import accelerate, quant_ops
    from bamba.quant.formats import make_scheme
    from bamba.quant.weights import QuantizedWeights

    out = _file_with_random_blocks(
        tmp_path, monkeypatch, lambda name, shape: Q.Q6_K if len(shape) > 1 and
        shape[-1] % 256 == 0 and not any(s in name for s in ("norm", "ssm_conv", "gate_inp"))
        else None, size=0.3, kind="granite-moe", intermediate_size=256,
        shared_intermediate_size=256, tie_word_embeddings=True)
    back = from_pretrained(out, dtype=torch.float32)
    held = [m for m in back.modules() if isinstance(m, QuantizedWeights)]
    assert len(held) == 4 * 2 + 2 * 2 + 2 * 4 + 4 * 2 + 2  # MLPs, Mamba, attention, experts,
    for m in held:  # the table and its head
        rows, cols = m.dense_shape
        assert m.scheme.two_level and not m.scheme.offsets and m.scheme.group_size == 16
        assert m.weight_table.shape == (rows, 1, 4 * cols // 256 + cols // 16)
        assert m.scheme.held_bits == 6 and m.weight_packed.dtype == torch.uint8
        assert m.weight_packed.shape[-1] == cols // 4 * 3
    assert back.lm_head.weight_table is back.model.embed_tokens.weight_table
    _assert_dequantized_as_gguf_does(back, out, [t.name for t in gguf.GGUFReader(out).tensors
                                                 if t.tensor_type == Q.Q6_K])
    back.save_pretrained(tmp_path / "saved")
    with safe_open(tmp_path / "saved" / "model.safetensors", "pt") as f:
        names = list(f.keys())
        scale = f.get_tensor("model.layers.0.mamba.in_proj.weight_scale")
    assert not any(n.endswith("weight_table") for n in names) and scale.dtype == torch.float32
    again = from_pretrained(tmp_path / "saved", dtype=torch.float32)
    assert again.model.layers[0].mamba.in_proj.scheme == make_scheme("int8", 16)
    ids = random_ids(2, 9)
    with torch.no_grad():
        assert torch.equal(again(ids), back(ids))
        previous = quant_ops.set_int8_activations(False)
        try:
            two_level, flat = (accelerate(m)(ids) for m in (from_pretrained(out), again))
        finally:
            quant_ops.set_int8_activations(previous)
    assert (two_level - flat).abs().max() <= 1e-3 * flat.abs().max()


@pytest.mark.parametrize("type_name", ["IQ4_NL", "IQ4_XS"])
def test_iq4_blocks_load_as_nibbles_of_their_levels(tmp_path, monkeypatch, type_name):
    """IQ4_NL (a float16 d per 32 weights) and IQ4_XS (a d per 256, a 6-bit scale per 32) pick
    each weight among 16 non-linear levels: they load as int4 nibbles in groups of 32 indexing
    the levels (float16 scales for IQ4_NL, IQ4_XS's d and signed scales as a K table), held in
    half a byte a weight, every weight as gguf-py dequantizes it, and the native kernels give
    the torch reference's logits; saved, they are int8 values of their levels, and load back
    alike."""
    from gguf import GGMLQuantizationType as Q

    from bamba.quant.formats import make_scheme
    from bamba.quant.linear import QuantizedLinear

    qtype = Q[type_name]
    picked = ("ffn_up.weight", "ssm_in.weight", "attn_q.weight")
    out = _file_with_random_blocks(tmp_path, monkeypatch, lambda name, shape: qtype
                                   if name.endswith(picked) else None, size=0.3)
    stored = [t.name for t in gguf.GGUFReader(out).tensors if t.tensor_type == qtype]
    assert len(stored) == 4 + 2 + 2  # ffn_up, ssm_in, attn_q
    back = from_pretrained(out, dtype=torch.float32)
    up = back.model.layers[0].feed_forward.up_proj
    xs = type_name == "IQ4_XS"
    assert isinstance(up, QuantizedLinear)
    assert up.scheme == make_scheme("int4", 32, two_level=xs, levels=True)
    assert up.weight_packed.dtype == torch.uint8
    assert up.weight_packed.shape == (up.out_features, up.in_features // 2)
    scales = up.weight_table if xs else up.weight_scale
    assert scales.dtype == (torch.uint8 if xs else torch.float16)
    _assert_dequantized_as_gguf_does(back, out, stored)
    _assert_native_decodes_as_torch(out, back)
    back.save_pretrained(tmp_path / "saved")
    saved = from_pretrained(tmp_path / "saved", dtype=torch.float32)
    up_saved = saved.model.layers[0].feed_forward.up_proj
    assert up_saved.scheme == make_scheme("int8", 32)
    assert torch.equal(up_saved.dequantized_weight(torch.float32),
                       up.dequantized_weight(torch.float32))
    ids = random_ids(2, 9)
    with torch.no_grad():
        assert torch.equal(saved(ids), back(ids))


def test_a_file_of_blocks_held_in_their_bits_exports_to_q8_0(tmp_path, monkeypatch):
    """export-gguf of a file whose linears are Q6_K, IQ4_XS and Q5_K (held in their own bits,
    Q6_K's and IQ4_XS's scales a K table) writes Q8_0 (it failed on the K tables' missing
    weight_scale), each weight within Q8_0's rounding of the source's."""
    from gguf import GGMLQuantizationType as Q

    from bamba.cli import main

    types = {"ffn_up.weight": Q.IQ4_XS, "ffn_gate.weight": Q.Q6_K, "ssm_in.weight": Q.Q5_K}
    source = _file_with_random_blocks(tmp_path, monkeypatch, lambda name, shape: types.get(
        name.split(".", 2)[-1]), size=0.3)
    monkeypatch.undo()  # the export's own types and quantization again
    assert main(["export-gguf", str(source), str(tmp_path / "q8_0.gguf"), "--dtype", "q8_0"]) == 0
    before = from_pretrained(source, dtype=torch.float32)
    after = from_pretrained(tmp_path / "q8_0.gguf", dtype=torch.float32)
    for name in ("feed_forward.up_proj", "feed_forward.gate_proj", "mamba.in_proj"):
        ours, theirs = (m.model.layers[0].get_submodule(name).dequantized_weight(torch.float32)
                        for m in (before, after))
        assert (ours - theirs).abs().max() <= 0.01 * ours.abs().max(), name


def _assert_native_decodes_as_torch(path: Path, reference: torch.nn.Module) -> None:
    """The native kernels (a prefill of 7 tokens, then a token at a time) give the torch
    reference's logits for a file, int8 activations off (the reference's activations at every
    row count): within 5% of the logits' size (the kernels' bf16 inputs on a random model)."""
    from bamba.native import accelerate, quant_ops
    from test_quant_interop import prefill_then_decode

    ids = random_ids(2, 11)
    previous = quant_ops.set_int8_activations(False)
    try:
        fast = prefill_then_decode(accelerate(from_pretrained(path)), ids, prefill=7)
    finally:
        quant_ops.set_int8_activations(previous)
    with torch.no_grad():
        ref = reference(ids)
    assert (fast - ref).abs().max().item() <= 5e-2 * ref.abs().max().item()


def _native_and_torch_logits(path: Path, reference: torch.nn.Module,
                             ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(native, torch) logits of ``ids`` [2, 11] through a Granite MoE file: the native model
    prefills 7 tokens (each picked expert's product on the quantized kernels, never a
    dequantized expert) and decodes the rest a token a call in the one-call step (asserted);
    ``reference`` is the file loaded without the kernels. int8 activations off (the reference's
    activations at every row count)."""
    from bamba.native import accelerate, decode_ops, quant_ops
    from bamba.quant.experts import QuantizedExpertWeights
    from test_quant_interop import prefill_then_decode

    calls = []
    real = decode_ops.decode_layers
    previous = quant_ops.set_int8_activations(False)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(decode_ops, "decode_layers",
                          lambda *a, **k: calls.append(1) or real(*a, **k))
            patch.setattr(QuantizedExpertWeights, "expert", None)
            fast = prefill_then_decode(accelerate(from_pretrained(path)), ids, prefill=7)
    finally:
        quant_ops.set_int8_activations(previous)
    assert len(calls) == 4
    with torch.no_grad():
        return fast, reference(ids)


@pytest.mark.parametrize("gate_up,down", [("Q4_K", "Q6_K"), ("Q5_K", "Q4_K"), ("Q6_K", "Q5_K"),
                                          ("IQ4_XS", "IQ4_NL")])
def test_k_quant_experts_stay_in_their_blocks_and_decode_natively(tmp_path, monkeypatch,
                                                                  gate_up, down):
    """A Granite MoE file's stacked experts in K-quant (or IQ4) blocks, a layer's two stacks in
    different types and layers differing (a Q4_K_M file's ffn_down_exps is Q6_K where its gate
    and up are Q4_K, in half its layers; here the first layer's down experts are Q6_K), stay
    in those blocks' formats (offsets included), every expert weight as gguf-py dequantizes
    it; the native kernels (prefill's products over each picked expert's slice, then the
    one-call decode step, each layer's experts in their formats) give the torch path's
    float32 logits within the rounding of their bf16 inputs: measured 1e-4 to 4e-4 of the
    logits' size, where zeroing the experts' offsets moves them 5-9% and shifting each
    expert's rows onto its neighbour's 9-14%. (The random blocks' fields are scaled to
    weights of a trained model's size: at full size they make this random model chaotic,
    rounding flipping expert picks.)"""
    from gguf import GGMLQuantizationType as Q

    from bamba.gguf.quantized import kind_scheme
    from bamba.quant.experts import QuantizedExpertWeights

    types = {"gate_exps": Q[gate_up], "up_exps": Q[gate_up], "down_exps": Q[down],
             "blk.0.ffn_down_exps": Q.Q6_K}  # the first layer's down experts: Q6_K

    def tensor_type(name, shape):
        kinds = [t for part, t in types.items() if f"ffn_{part}" in name or part in name]
        return kinds[-1] if kinds else None

    out = _file_with_random_blocks(tmp_path, monkeypatch, tensor_type, size=0.03,
                                   kind="granite-moe", intermediate_size=256,
                                   shared_intermediate_size=256)
    assert {gate_up, down} <= _types(out)
    back = from_pretrained(out, dtype=torch.float32)
    first, last = (back.model.layers[i].feed_forward.experts for i in (0, -1))
    for stacked, type_name in ((last.input_linear, gate_up), (last.output_linear, down),
                               (first.output_linear, "Q6_K")):
        assert isinstance(stacked, QuantizedExpertWeights), type(stacked)
        scheme = stacked.scheme
        assert scheme == kind_scheme(type_name)
        if scheme.offsets:  # held as stored, the kernels' layout (each expert a slice of rows)
            assert stacked.kernel_weights().scales is stacked.weight_table
            assert stacked.weight_table.dtype == torch.uint8 and scheme.two_level
    _assert_dequantized_as_gguf_does(back, out, [t.name for t in gguf.GGUFReader(out).tensors
                                                 if "_exps" in t.name])
    fast, ref = _native_and_torch_logits(out, back, random_ids(2, 11, seed=5))
    assert (fast - ref).abs().max().item() <= 5e-3 * ref.abs().max().item()


def test_a_file_mixing_block_types_saves_each_linear_in_its_own_scheme(make_hf_checkpoint,
                                                                        tmp_path, monkeypatch):
    """A Granite MoE file of Q8_0 linears and Q4_0 experts, but for the first layer's Q8_0 down
    experts: the recorded quantization_config gives each linear and each layer's experts their
    own scheme, so save_pretrained writes it and the checkpoint loads back with the same
    logits, each expert stack in its scheme."""
    from gguf import GGMLQuantizationType as Q

    from bamba.gguf import export as gguf_export

    real = gguf_export._tensor_type
    monkeypatch.setattr(gguf_export, "_tensor_type", lambda name, shape, file_type: Q.Q4_0 if
                        "_exps" in name and not name.startswith("blk.0.ffn_down")
                        else real(name, shape, file_type))
    source = make_hf_checkpoint("granite-moe", hidden_size=128, intermediate_size=128,
                                shared_intermediate_size=128, mamba_d_head=64)
    out = export_gguf(from_pretrained(source), load_tokenizer(source), tmp_path / "m.gguf",
                      "q8_0")
    assert {"Q4_0", "Q8_0"} <= _types(out)
    back = from_pretrained(out)
    back.save_pretrained(tmp_path / "saved")
    again = from_pretrained(tmp_path / "saved")
    schemes = [(e.input_linear.scheme.name, e.output_linear.scheme.name)
               for e in (layer.feed_forward.experts for layer in again.model.layers)]
    assert schemes == [("int4", "int8")] + [("int4", "int4")] * (len(schemes) - 1)
    ids = random_ids(1, 9)
    with torch.no_grad():
        assert torch.equal(again(ids), back(ids))


def test_a_one_group_mamba_norm_written_flat_loads(make_hf_checkpoint, tmp_path, monkeypatch):
    """llama-quantize writes a one-group Mamba norm as [D] where the converter wrote [1, D]
    (it drops trailing dimensions of size 1): the same elements, read alike."""
    from bamba.gguf import export as gguf_export

    source = make_hf_checkpoint("hybrid", mamba_n_groups=1)
    real = gguf_export.gguf_shape
    monkeypatch.setattr(gguf_export, "gguf_shape", lambda ours, shape, config: tuple(
        n for n in real(ours, shape, config) if n != 1) if ours.endswith("mamba.norm.weight")
        else real(ours, shape, config))
    model = from_pretrained(source)
    out = export_gguf(model, load_tokenizer(source), tmp_path / "flat.gguf", "f32")
    norm = next(t for t in gguf.GGUFReader(out).tensors if t.name == "blk.0.ssm_norm.weight")
    assert len(norm.shape) == 1
    ids = random_ids(1, 12)
    with torch.no_grad():
        assert torch.equal(from_pretrained(out)(ids), model(ids))


def test_tokenizer_round_trips_through_gguf_metadata(make_hf_checkpoint, tmp_path):
    source = make_hf_checkpoint("hybrid")
    tokenizer = load_tokenizer(source)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    out = export_gguf(from_pretrained(source), tokenizer, tmp_path / "m.gguf", "f32")
    back = load_tokenizer(out)
    for text in [*TOKENIZER_TEXTS, "<s>special</s> and  two  spaces\n\nlines"]:
        assert back.encode(text) == tokenizer.encode(text)
        assert back.decode(back.encode(text)) == tokenizer.decode(tokenizer.encode(text))
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (1, 2, 0)
    assert back.chat_template == tokenizer.chat_template
    tokens = gguf.GGUFReader(out).get_field("tokenizer.ggml.tokens").contents()
    assert len(tokens) == 320 and tokens[-1] == "[PAD319]"  # padded to the model's vocabulary


# Texts where the splits differ: contractions in capitals, digit runs, newlines and spaces.
SPLIT_TEXTS = [*TOKENIZER_TEXTS, "I'LL say DON'T, you're 1234567 and 89 or 1 22 333.",
               "a\n\n  b\t\tc   \r\n d  ", "  lead and trail  ", "x=1;y+=22/7 東京 café"]


def _split_checkpoint(make_hf_checkpoint, name: str) -> Path:
    """A checkpoint whose tokenizer splits as llama.cpp's pre-tokenizer ``name``."""
    from bamba.gguf.vocab import SPLITS

    source = make_hf_checkpoint("hybrid", tokenizer=False)
    build_tokenizer(split=SPLITS[name]).save_pretrained(source)
    return source


@pytest.mark.parametrize("name", ["llama-bpe", "dbrx", "qwen2"])
def test_llama3_and_qwen2_splits_travel_by_their_llama_cpp_names(make_hf_checkpoint, tmp_path,
                                                                  name):
    """Llama 3's split (Bamba-9B's tokenizer; with its whole words skipping the merges, or
    not, as cl100k-style tokenizers) and Qwen2's: exported under llama.cpp's name, read back
    encoding as the source tokenizer does (as GPT-2's split would not: digit runs, capital
    contractions and newlines split otherwise)."""
    from transformers import AutoTokenizer

    source = _split_checkpoint(make_hf_checkpoint, name)
    out = export_gguf(from_pretrained(source), load_tokenizer(source), tmp_path / "m.gguf", "f32")
    assert gguf.GGUFReader(out).get_field("tokenizer.ggml.pre").contents() == name
    theirs, back = AutoTokenizer.from_pretrained(source), load_tokenizer(out)
    gpt2 = load_tokenizer(make_hf_checkpoint("hybrid"))
    differs = False
    for text in SPLIT_TEXTS:
        assert back.encode(text, add_special_tokens=False) == \
            theirs(text, add_special_tokens=False)["input_ids"], text
        assert back.decode(back.encode(text)) == text
        differs |= gpt2.backend.pre_tokenizer.pre_tokenize_str(text) != \
            back.backend.pre_tokenizer.pre_tokenize_str(text)
    assert differs


def test_a_pre_tokenizer_without_a_llama_cpp_name_is_refused(make_hf_checkpoint, tmp_path):
    source = _split_checkpoint(make_hf_checkpoint, "dbrx")
    tokenizer = load_tokenizer(source)
    raw = json.loads(tokenizer.backend.to_str())
    raw["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+"
    from tokenizers import Tokenizer as Backend
    tokenizer.backend = Backend.from_str(json.dumps(raw))
    with pytest.raises(ValueError, match="needs a byte-level pre-tokenizer llama.cpp names"):
        export_gguf(from_pretrained(source), tokenizer, tmp_path / "m.gguf", "f32")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt-2", "llama-bpe", "dbrx", "qwen2"])
def test_llama_cpp_tokenizes_our_export_as_bamba_does(make_hf_checkpoint, tmp_path, name):
    """llama-server's /tokenize of our export: the ids bamba's GGUF tokenizer gives."""
    import httpx

    source = make_hf_checkpoint("hybrid") if name == "gpt-2" else \
        _split_checkpoint(make_hf_checkpoint, name)
    out = export_gguf(from_pretrained(source), load_tokenizer(source), tmp_path / "m.gguf", "f32")
    ours = load_tokenizer(out)
    server = llama_cpp.start(llama_cpp.find_or_build(), out, 8918, 1, 1, 256)
    try:
        for text in SPLIT_TEXTS:
            reply = httpx.post("http://127.0.0.1:8918/tokenize", timeout=60,
                               json={"content": text, "add_special": False}).json()
            assert reply["tokens"] == ours.encode(text, add_special_tokens=False), text
    finally:
        server.kill()
        server.wait()


def test_gguf_magic_without_the_suffix_is_recognised(make_hf_checkpoint, tmp_path):
    source = make_hf_checkpoint("hybrid")
    out = export_gguf(from_pretrained(source), load_tokenizer(source), tmp_path / "m.bin", "f32")
    assert is_gguf(out) and not is_gguf(source / "config.json")
    assert from_pretrained(out).config.attn_layer_indices == [1, 3]


@pytest.mark.parametrize("kind, file_type", [("hybrid", "bf16"), ("hybrid", "q8_0"),
                                             ("granite-moe", "q4_0"), ("llama", "f32")])
def test_cli_export_reads_a_tensor_at_a_time_and_writes_what_the_loaded_model_writes(
        make_hf_checkpoint, tmp_path, monkeypatch, kind, file_type):
    """`bamba export-gguf` of a dense checkpoint never loads the model (its tensors are read,
    converted and written one at a time: a model larger than memory exports); the file is
    the one export_gguf writes from the loaded model, byte for byte (a bf16 checkpoint)."""
    import torch

    from bamba import checkpoint

    source = make_hf_checkpoint(kind)
    hf_model(kind).to(torch.bfloat16).save_pretrained(source)
    dtype = torch.bfloat16 if file_type == "bf16" else torch.float32
    (tmp_path / "loaded").mkdir()
    (tmp_path / "streamed").mkdir()
    loaded = export_gguf(from_pretrained(source, dtype=dtype), load_tokenizer(source),
                         tmp_path / "loaded" / "m.gguf", file_type)
    monkeypatch.setattr(checkpoint, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    assert main(["export-gguf", str(source), str(tmp_path / "streamed" / "m.gguf"), "--dtype",
                 file_type]) == 0
    assert (tmp_path / "streamed" / "m.gguf").read_bytes() == loaded.read_bytes()


def test_cli_exports_and_generates_from_the_file(make_hf_checkpoint, tmp_path, capsys):
    source = make_hf_checkpoint("hybrid")
    out = tmp_path / "m.gguf"
    assert main(["export-gguf", str(source), str(out), "--dtype", "f32"]) == 0
    assert capsys.readouterr().out == f"wrote {out} (f32)\n"
    argv = ["generate", "--prompt", "State space", "--max-new-tokens", "6", "--threads", "1",
            "--dtype", "float32"]
    assert main([*argv, "--model", str(source)]) == 0
    expected = capsys.readouterr().out
    assert main([*argv, "--model", str(out)]) == 0
    assert capsys.readouterr().out == expected


# ---- bad input ----------------------------------------------------------------------------------
def _cli_error(path: Path, capsys) -> str:
    capsys.readouterr()
    assert main(["generate", "--model", str(path), "--prompt", "x", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("bamba generate: error:"), err
    return err


def _export_with(config_changes: dict, make_hf_checkpoint, path: Path) -> Path:
    """An export whose metadata describes ``config_changes`` but whose tensors do not."""
    source = make_hf_checkpoint("hybrid")
    model = from_pretrained(source)
    model.config = model.config.replace(**config_changes)
    return export_gguf(model, load_tokenizer(source), path, "f32")


def test_export_refuses_what_llama_cpp_cannot_run_and_writes_nothing(make_hf_checkpoint,
                                                                     tmp_path, capsys):
    source = make_hf_checkpoint("hybrid", mamba_expand=4, mamba_d_head=32)
    out = tmp_path / "m.gguf"
    capsys.readouterr()
    assert main(["export-gguf", str(source), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "bamba export-gguf: error: llama.cpp's granitehybrid runs mamba_expand 2 only, " \
        "got 4"
    assert list(tmp_path.iterdir()) == [source]


def test_quantize_of_a_gguf_file_says_it_needs_a_checkpoint(make_hf_checkpoint, tmp_path,
                                                            capsys):
    """`bamba quantize` reads checkpoint directories: a GGUF file is named as such in one line
    (it said "is a file, expected a checkpoint directory or a GGUF file"), nothing written."""
    source = make_hf_checkpoint("hybrid")
    out = export_gguf(from_pretrained(source), load_tokenizer(source), tmp_path / "m.gguf", "f32")
    capsys.readouterr()
    assert main(["quantize", str(out), str(tmp_path / "q"), "--scheme", "int8",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a GGUF file, where this needs a checkpoint" in err
    assert not (tmp_path / "q").exists()


def test_an_architecture_we_do_not_run_is_named(tmp_path, capsys):
    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(path, "mamba2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    assert "architecture 'mamba2' is not one bamba runs" in _cli_error(path, capsys)


def test_a_truncated_file_is_named(make_hf_checkpoint, tmp_path, capsys):
    source = make_hf_checkpoint("hybrid")
    out = export_gguf(from_pretrained(source), load_tokenizer(source), tmp_path / "m.gguf", "f32")
    data = out.read_bytes()
    for keep in (len(data) - 100, 2000):  # inside the tensor data, inside the metadata
        out.write_bytes(data[:keep])
        assert "truncated" in _cli_error(out, capsys)


def test_metadata_sizes_that_make_no_model_are_named(make_hf_checkpoint, tmp_path, capsys):
    """More heads than embedding dimensions (a flipped bit), a head length of 0: the config's
    one-line error, not a division by it on the way there (found by
    tests/test_checkpoint_fuzz.py)."""
    source = make_hf_checkpoint("hybrid")
    out = export_gguf(from_pretrained(source), load_tokenizer(source), tmp_path / "m.gguf", "f32")
    data = bytearray(out.read_bytes())
    key = b"granitehybrid.attention.head_count"
    at = data.index(key) + len(key)
    assert struct.unpack_from("<II", data, at) == (gguf.GGUFValueType.UINT32, 4)
    struct.pack_into("<I", data, at + 4, 64)  # 32 embedding dimensions
    out.write_bytes(bytes(data))
    assert "granitehybrid.attention: a head length of 0 (embedding_length 32, head_count 64)" \
        in _cli_error(out, capsys)


def test_tensors_the_metadata_does_not_predict_are_named(make_hf_checkpoint, tmp_path, capsys):
    more = _export_with({"num_hidden_layers": 5}, make_hf_checkpoint, tmp_path / "a.gguf")
    assert "tensor blk.4.attn_norm.weight is missing" in _cli_error(more, capsys)
    fewer = _export_with({"num_hidden_layers": 3, "attn_layer_indices": [1]},
                         make_hf_checkpoint, tmp_path / "b.gguf")
    assert "unexpected tensor blk.3." in _cli_error(fewer, capsys)
    wider = _export_with({"intermediate_size": 64}, make_hf_checkpoint, tmp_path / "c.gguf")
    assert "ffn_gate.weight has shape (32, 48), the metadata gives (32, 64)" \
        in _cli_error(wider, capsys)


# ---- llama.cpp ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("outtype, atol", [("f32", 1e-4), ("f16", 2e-2)])
def test_llama_cpp_converter_output_loads_with_the_source_logits(make_hf_checkpoint, tmp_path,
                                                                  outtype, atol):
    """llama.cpp's convert_hf_to_gguf.py interleaves whole q/k heads and writes no chunk size:
    the reader undoes the first and Bamba's rotary half comes from transformers' definition.
    (Its Llama path needs sentencepiece, which the project does not install.)"""
    source = make_hf_checkpoint("hybrid")
    out = llama_cpp.convert(source, tmp_path / "conv.gguf", outtype)
    assert outtype.upper() in _types(out)
    ids = random_ids(2, 24)
    with torch.no_grad():
        ours = from_pretrained(out)(ids)
    torch.testing.assert_close(ours, hf_logits(load_hf(source), ids), atol=atol, rtol=0)
    assert load_tokenizer(out).encode(TOKENIZER_TEXTS[0]) == \
        load_tokenizer(source).encode(TOKENIZER_TEXTS[0])


@pytest.mark.slow
def test_llama_cpp_decodes_our_int4_blocks_as_bamba_does(memorised, tmp_path):
    """An int4 checkpoint (head and table too) exported to q4_0 block for block: llama-server
    continues the memorised sequence with the tokens bamba gives on the checkpoint itself."""
    source, model, sequence = memorised
    bf16 = tmp_path / "bf16"
    model.to(torch.bfloat16).save_pretrained(bf16)
    model.float()
    for item in source.glob("*token*"):
        shutil.copy(item, bf16)
    quantized, out = tmp_path / "int4", tmp_path / "m.gguf"
    assert main(["quantize", str(bf16), str(quantized), "--scheme", "int4", "--group-size", "32",
                 "--lm-head", "int4", "--embedding", "int4", "--no-progress"]) == 0
    assert main(["export-gguf", str(quantized), str(out), "--dtype", "q4_0"]) == 0
    ours = _greedy(from_pretrained(quantized), sequence[:8], 24)
    assert ours[:8] == sequence[8:16]  # still memorised at int4
    tokens = _llama_cpp_greedy(out, sequence[:8], 24, 8918)
    assert tokens == ours


@pytest.mark.slow
@pytest.mark.parametrize("kind, seed", [("hybrid", 0), ("llama", 0), ("granite", 4),
                                        ("granite-rope", 4), ("granite-moe", 4)])
def test_llama_cpp_decodes_our_export_as_bamba_does(make_hf_checkpoint, tmp_path, kind, seed):
    """Our f32 export runs in llama.cpp (granitehybrid: Bamba, Granite with and without rope
    (the file's rope switch), with experts; llama: the twin) with bamba's greedy tokens."""
    source = make_hf_checkpoint(kind, seed=seed)
    model = from_pretrained(source)
    out = export_gguf(model, load_tokenizer(source), tmp_path / "m.gguf", "f32")
    tokens = _llama_cpp_greedy(out, PROMPT, 32, 8917)
    assert tokens == _greedy(model, PROMPT, 32)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["granite", "granite-moe"])
def test_llama_cpp_converter_output_of_granite_loads_with_the_source_logits(make_hf_checkpoint,
                                                                            tmp_path, kind):
    """llama.cpp's converter on a Granite 4.0 hybrid (layer_types in the published
    checkpoints' names, which it reads): gate and up split, the multipliers as GGUF scales,
    rope switched off, experts as *_exps beside the *_shexp shared MLP; bamba reads it back as
    the same Granite model."""
    import json

    source = make_hf_checkpoint(kind)
    config = json.loads((source / "config.json").read_text())
    config["layer_types"] = ["attention" if t == "full_attention" else "mamba"
                             for t in config["layer_types"]]
    (source / "config.json").write_text(json.dumps(config))
    out = llama_cpp.convert(source, tmp_path / "conv.gguf", "f32")
    ids = random_ids(2, 24)
    back = from_pretrained(out)
    assert back.config.model_type == "granitemoehybrid" and not back.config.uses_rope
    with torch.no_grad():
        torch.testing.assert_close(back(ids), hf_logits(load_hf(source), ids), atol=1e-4,
                                   rtol=0)



@pytest.mark.slow
@pytest.mark.parametrize("file_type", ["Q4_K_M", "IQ4_XS", "IQ4_NL"])
def test_llama_cpp_and_bamba_decode_a_tied_file_alike(tmp_path, file_type):
    """A tied Granite checkpoint that continues a sequence by heart, exported and quantized by
    llama.cpp's llama-quantize (no output tensor: Granite 4.0's files; Q4_K_M's token table in
    Q6_K): bamba holds the table once in its blocks, the head reading them, every weight as
    gguf-py dequantizes it, and decodes the file greedily as llama.cpp does, with the torch
    path and with the native kernels."""
    from bamba.native import accelerate
    from bamba.quant.embedding import QuantizedEmbedding

    source = tmp_path / "source"
    hf_model("granite", hidden_size=256, intermediate_size=512, shared_intermediate_size=512,
             mamba_d_head=128, tie_word_embeddings=True).save_pretrained(source)
    build_tokenizer().save_pretrained(source)
    model, sequence = _memorise(from_pretrained(source))
    f32 = export_gguf(model, load_tokenizer(source), tmp_path / "m.gguf", "f32")
    out = tmp_path / f"m-{file_type}.gguf"
    quantize = llama_cpp.find_or_build(tool="llama-quantize")
    llama_cpp._run([str(quantize), str(f32), str(out), file_type], tmp_path / "q.log", 600)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert "output.weight" not in types and file_type.split("_")[0] in "".join(types.values())
    back = from_pretrained(out)
    table = back.model.embed_tokens
    assert isinstance(table, QuantizedEmbedding)
    assert back.lm_head.weight_packed is table.weight_packed
    _assert_dequantized_as_gguf_does(back, out, [n for n, t in types.items()
                                                 if t.startswith(("Q", "IQ"))])
    tokens = _llama_cpp_greedy(out, sequence[:8], 16, 8918)
    assert tokens[:8] == sequence[8:16]  # it did memorise, through the file's blocks
    assert _greedy(back, sequence[:8], 16) == tokens
    assert _greedy(accelerate(from_pretrained(out)), sequence[:8], 16) == tokens


@pytest.mark.slow
def test_llama_quantize_k_quant_files_load(tmp_path):
    """llama.cpp's own Q4_K_M of our export (K-quants need rows of whole 256-weight blocks:
    hidden 256) loads in its blocks' formats (Q4_K as int4 with offsets, Q6_K as int8 in groups
    of 16), each K-quant tensor as gguf-py dequantizes it, and the native kernels run it. With
    one Mamba group (Bamba-9B's), llama-quantize writes the Mamba norm as [D], not [1, D]."""
    source = tmp_path / "source"
    hf_model("hybrid", hidden_size=256, intermediate_size=512, mamba_d_head=128,
             mamba_n_groups=1).save_pretrained(source)
    build_tokenizer().save_pretrained(source)
    model = from_pretrained(source)
    f32 = export_gguf(model, load_tokenizer(source), tmp_path / "m.gguf", "f32")
    out = tmp_path / "m-q4_k_m.gguf"
    quantize = llama_cpp.find_or_build(tool="llama-quantize")
    llama_cpp._run([str(quantize), str(f32), str(out), "Q4_K_M"], tmp_path / "q.log", 600)
    k_quants = [t.name for t in gguf.GGUFReader(out).tensors if t.tensor_type.name.endswith("_K")]
    assert k_quants, _types(out)
    norm = next(t for t in gguf.GGUFReader(out).tensors if t.name == "blk.0.ssm_norm.weight")
    assert len(norm.shape) == 1
    back = from_pretrained(out, dtype=torch.float32)
    _assert_dequantized_as_gguf_does(back, out, k_quants)
    from bamba.quant.linear import QuantizedLinear

    held = {(m.scheme.name, m.scheme.group_size, m.scheme.offsets) for m in back.modules()
            if isinstance(m, QuantizedLinear)}
    assert ("int4", 32, True) in held and ("int8", 16, False) in held  # Q4_K, Q6_K
    from bamba.native import accelerate, quant_ops

    ids = random_ids(2, 11)
    quant_ops.set_int8_activations(False)  # this random model amplifies their rounding to ~7%
    try:
        with torch.no_grad():
            fast, ref = accelerate(from_pretrained(out))(ids), back(ids)
    finally:
        quant_ops.set_int8_activations(True)
    assert (fast - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


@pytest.mark.slow
def test_llama_quantize_q4_k_m_of_a_granite_moe_keeps_its_experts_in_their_blocks(tmp_path):
    """llama.cpp's own Q4_K_M of a Granite MoE export (K-quants need rows of whole 256-weight
    blocks: hidden and expert widths 256): its expert stacks load in their K-quant formats
    (Q4_K gate and up; down in Q6_K or Q4_K by layer, as llama-quantize picks), each as gguf-py
    dequantizes it, and the one-call decode step runs them near the torch path (float32, int8
    activations off; the kernels' bf16 inputs: 0.9-1.5% of the logits' size over 4 id seeds,
    one seed 20% where rounding flips an expert pick; the experts' offsets dropped: 106-148%)."""
    from bamba.quant.experts import QuantizedExpertWeights

    source = tmp_path / "source"
    hf_model("granite-moe", hidden_size=256, intermediate_size=256,
             shared_intermediate_size=256, mamba_d_head=128).save_pretrained(source)
    build_tokenizer().save_pretrained(source)
    f32 = export_gguf(from_pretrained(source), load_tokenizer(source), tmp_path / "m.gguf", "f32")
    out = tmp_path / "m-q4_k_m.gguf"
    quantize = llama_cpp.find_or_build(tool="llama-quantize")
    llama_cpp._run([str(quantize), str(f32), str(out), "Q4_K_M"], tmp_path / "q.log", 600)
    experts = [t for t in gguf.GGUFReader(out).tensors if "_exps" in t.name]
    assert {t.tensor_type.name for t in experts} >= {"Q4_K"}, _types(out)
    back = from_pretrained(out, dtype=torch.float32)
    stacks = [s for layer in back.model.layers for s in (layer.feed_forward.experts.input_linear,
                                                         layer.feed_forward.experts.output_linear)]
    assert all(isinstance(s, QuantizedExpertWeights) for s in stacks)
    _assert_dequantized_as_gguf_does(back, out, [t.name for t in experts])
    fast, ref = _native_and_torch_logits(out, back, random_ids(2, 11))
    assert (fast - ref).abs().max().item() <= 5e-2 * ref.abs().max().item()


def test_the_reader_reads_every_field_and_tensor_as_gguf_py_does(memorised, tmp_path):
    """Fields read through a plain view of the file's map (``open_gguf``) are gguf-py's own:
    every key's types and contents (the vocabulary's arrays included), every tensor's name,
    type, shape, offset and bytes."""
    from bamba.gguf.reader import open_gguf

    source, model, _ = memorised
    out = export_gguf(model, load_tokenizer(source), tmp_path / "m.gguf", "q4_0")
    ours, theirs = open_gguf(out), gguf.GGUFReader(out)
    assert list(ours.fields) == list(theirs.fields) and len(ours.fields) > 20
    for name, field in theirs.fields.items():
        mine = ours.fields[name]
        assert (mine.types, mine.offset, mine.data) == (field.types, field.offset, field.data)
        assert mine.contents() == field.contents(), name
    assert len(ours.tensors) == len(theirs.tensors)
    for mine, tensor in zip(ours.tensors, theirs.tensors):
        assert (mine.name, mine.tensor_type, list(mine.shape), mine.data_offset) == \
            (tensor.name, tensor.tensor_type, list(tensor.shape), tensor.data_offset)
        assert bytes(mine.data) == bytes(tensor.data)
