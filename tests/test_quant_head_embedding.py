"""The LM head and the token embeddings in quantization schemes of their own (``bamba quantize
--lm-head / --embedding``, as llama.cpp's --output-tensor-type / --token-embedding-type):
written as extra compressed-tensors config groups, loaded with both still quantized, the same
tokens through ``generate``, the engine and its native decode step as through plain forward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from bamba.checkpoint import from_pretrained
from bamba.cli import main
from bamba.config import preset
from bamba.engine import LLM, SamplingParams
from bamba.generation import GenerationConfig, generate
from bamba.model import BambaLM
from bamba.quant.apply import quantize_model
from bamba.quant.config import parse_quantization_config, quantization_config_dict
from bamba.quant.embedding import QuantizedEmbedding
from bamba.quant.formats import FP8, QuantScheme, dequantize, quantize
from bamba.quant.linear import QuantizedLinear
from serve_helpers import save_tiny_checkpoint

PROMPT = [5, 17, 42, 7, 99]
EMBEDDING_SCHEMES = [QuantScheme("fp8"), QuantScheme("int8"), QuantScheme("int4", 16)]
# linears int4 group 16; (lm_head, embeddings) schemes; the config format they make
VARIANTS = {
    "int8-head-int4-embeddings": (["--lm-head", "int8", "--embedding", "int4"],
                                  QuantScheme("int8"), QuantScheme("int4", 16)),
    "fp8-head-int8-embeddings": (["--lm-head", "fp8", "--embedding", "int8"],
                                 QuantScheme("fp8"), QuantScheme("int8")),
}


@pytest.mark.parametrize("scheme", EMBEDDING_SCHEMES, ids=lambda s: s.name)
def test_quantized_embedding_is_a_lookup_in_the_dequantized_table(scheme):
    dense = torch.nn.Embedding(40, 64).to(torch.bfloat16)
    layer = QuantizedEmbedding.from_embedding(dense, scheme)
    table = dequantize(quantize(dense.weight, scheme), scheme, torch.bfloat16)
    ids = torch.tensor([[3, 0, 39], [7, 7, 12]])
    out = layer(ids)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 64)
    assert torch.equal(out, F.embedding(ids, table))
    assert not [t for t in layer.state_dict().values() if t.dtype == torch.bfloat16 and
                t.dim() == 2 and t.shape[1] == 64]  # no dense copy of the table
    layer.float()  # a module cast changes the activations' dtype, never the stored codes
    float_table = dequantize(quantize(dense.weight, scheme), scheme, torch.float32)
    assert torch.equal(layer(ids), F.embedding(ids, float_table))
    if scheme.name == "fp8":
        assert layer.weight.dtype == FP8


def test_a_group_naming_a_module_wins_over_its_class_as_in_compressed_tensors():
    raw = quantization_config_dict(QuantScheme("int4", 128), [], lm_head=QuantScheme("int8"))
    config = parse_quantization_config(raw)
    assert config.group_for("lm_head", ("Linear",)).scheme == QuantScheme("int8")
    assert config.group_for("model.layers.0.mamba.in_proj", ("Linear",)).scheme.name == "int4"
    reordered = dict(raw, config_groups=dict(reversed(list(raw["config_groups"].items()))))
    assert parse_quantization_config(reordered).group_for("lm_head", ("Linear",)).scheme.name \
        == "int8"
    regex = dict(raw, config_groups={**raw["config_groups"], "group_9": {
        **raw["config_groups"]["group_0"], "targets": ["re:lm_.*"]}})
    regex["config_groups"]["group_9"]["weights"] = {**regex["config_groups"]["group_9"][
        "weights"], "group_size": 64}
    config = parse_quantization_config(regex)
    assert config.group_for("lm_head", ("Linear",)).scheme == QuantScheme("int8")  # exact name
    assert config.group_for("lm_x", ("Linear",)).scheme == QuantScheme("int4", 64)  # regex
    assert config.group_for("x", ("Linear",)).scheme == QuantScheme("int4", 128)  # class


def test_config_of_two_formats_is_mixed_precision_with_each_groups_format():
    raw = quantization_config_dict(QuantScheme("int4", 128), [], lm_head=QuantScheme("fp8"))
    assert raw["format"] == "mixed-precision"
    assert [g["format"] for g in raw["config_groups"].values()] == ["pack-quantized",
                                                                    "float-quantized"]
    ct = pytest.importorskip("compressed_tensors.quantization")
    assert ct.QuantizationConfig.model_validate(raw).format == "mixed-precision"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("head-embeddings")
    dense = save_tiny_checkpoint(root / "dense")
    out = {"dense": dense}
    for name, (flags, _, _) in VARIANTS.items():
        assert main(["quantize", str(dense), str(root / name), "--no-progress", "--scheme",
                     "int4", "--group-size", "16", *flags]) == 0
        out[name] = root / name
    return out


@pytest.mark.parametrize("name", VARIANTS)
def test_head_and_embeddings_are_written_loaded_and_kept_quantized(checkpoints, name):
    _, head, embedding = VARIANTS[name]
    raw = json.loads((checkpoints[name] / "config.json").read_text())["quantization_config"]
    assert raw == quantization_config_dict(QuantScheme("int4", 16), [], head, embedding)
    written = load_file(checkpoints[name] / "model.safetensors")
    for prefix, scheme in (("lm_head", head), ("model.embed_tokens", embedding)):
        assert f"{prefix}.weight_scale" in written
        assert (f"{prefix}.weight" in written) == (scheme.name == "fp8")
    assert from_pretrained(checkpoints[name], dtype=torch.bfloat16).dtype == torch.bfloat16
    model = from_pretrained(checkpoints[name])  # float32, as the source was saved
    assert isinstance(model.lm_head, QuantizedLinear) and model.lm_head.scheme == head
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    assert model.model.embed_tokens.scheme == embedding and model.dtype == torch.float32
    reference = quantize_model(from_pretrained(checkpoints["dense"]), QuantScheme("int4", 16),
                               [], lm_head=head, embedding=embedding)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids))


@pytest.mark.parametrize("name", VARIANTS)
def test_generate_and_the_engine_give_the_tokens_of_plain_forward(checkpoints, name, tmp_path):
    directory = checkpoints[name]
    model = from_pretrained(directory)
    ids, want = list(PROMPT), []
    with torch.no_grad():
        for _ in range(8):
            want.append(int(model(torch.tensor([ids + want]))[0, -1].argmax()))
    config = GenerationConfig(max_new_tokens=8, eos_token_ids=[])
    assert generate(from_pretrained(directory), [PROMPT], config)[0].token_ids == want
    llm = LLM(str(directory), dtype="float32", memory_gb=0.01)  # the native decode step
    out = llm.generate([PROMPT, PROMPT[:3]], SamplingParams(temperature=0, max_tokens=8,
                                                            ignore_eos=True))
    assert list(out[0].outputs[0].token_ids) == want
    model.save_pretrained(tmp_path / "again")
    again = from_pretrained(tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(again(torch.tensor([PROMPT])), model(torch.tensor([PROMPT])))


@pytest.mark.parametrize("name", VARIANTS)
def test_head_and_table_are_stored_as_quantize_makes_them(checkpoints, name):
    _, head, embedding = VARIANTS[name]
    dense = load_file(checkpoints["dense"] / "model.safetensors")
    written = load_file(checkpoints[name] / "model.safetensors")
    for prefix, scheme in (("lm_head", head), ("model.embed_tokens", embedding)):
        want = quantize(dense[f"{prefix}.weight"], scheme)
        held = {k.removeprefix(f"{prefix}."): v for k, v in written.items()
                if k.startswith(f"{prefix}.")}
        assert set(held) == set(want), prefix
        for key, tensor in want.items():
            assert torch.equal(held[key].view(torch.uint8), tensor.view(torch.uint8)), key


@pytest.mark.parametrize("flags, fragment", [
    (["--lm-head", "int8", "--ignore", "lm_head"], "--lm-head quantizes the lm_head"),
    (["--embedding", "int4"], "group size 128 does not divide embedding_dim 32 of "
                              "model.embed_tokens"),
])
def test_head_and_embedding_flag_errors_are_one_line(checkpoints, tmp_path, capsys, flags,
                                                     fragment):
    code = main(["quantize", str(checkpoints["dense"]), str(tmp_path / "out"), "--no-progress",
                 "--scheme", "int4", *flags])
    assert code == 2 and not (tmp_path / "out").exists()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err


def test_quantizing_a_tied_head_or_table_unties_them_in_memory():
    """As llm-compressor does: the head gets a copy of the table, the config says untied."""
    model = BambaLM(preset("tiny", tie_word_embeddings=True))
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        dense = model(ids)
    quantize_model(model, QuantScheme("int8"), [], embedding=QuantScheme("int8"))
    assert not model.config.tie_word_embeddings
    assert isinstance(model.lm_head, QuantizedLinear)
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    with torch.no_grad():
        assert (model(ids) - dense).abs().max() < 0.1 * dense.abs().max()


def test_quantizing_a_tied_table_alone_keeps_the_head_reading_it(tmp_path):
    """`--embedding` alone on a tied checkpoint keeps it tied, as llama.cpp's files of such
    models are: the table is quantized once, no head is stored, and the head reads the
    quantized table (a QuantizedLinear holding its tensors), in bamba's loader as in memory;
    generate and the engine decode it with the greedy tokens of whole forwards."""
    from conftest import build_tokenizer, hf_model

    source = tmp_path / "tied"
    hf_model("hybrid", tie_word_embeddings=True).save_pretrained(source)
    build_tokenizer().save_pretrained(source)
    target = tmp_path / "q"
    assert main(["quantize", str(source), str(target), "--scheme", "int8", "--embedding",
                 "int8", "--no-progress"]) == 0
    assert json.loads((target / "config.json").read_text())["tie_word_embeddings"] is True
    assert not any(k.startswith("lm_head") for k in load_file(target / "model.safetensors"))
    model = from_pretrained(target)
    memory = quantize_model(from_pretrained(source), QuantScheme("int8"),
                            embedding=QuantScheme("int8"))
    for m in (model, memory):
        table, head = m.model.embed_tokens, m.lm_head
        assert isinstance(table, QuantizedEmbedding) and isinstance(head, QuantizedLinear)
        assert head.weight_packed is table.weight_packed and m.config.tie_word_embeddings
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    with torch.no_grad():
        expected = torch.nn.functional.embedding(ids, table.dequantized_weight(torch.float32))
        assert torch.equal(model.model.embed_tokens(ids), expected)
        assert torch.equal(model(ids), memory(ids))
        want = []
        for _ in range(8):  # greedy by whole forwards
            want.append(int(model(torch.tensor([PROMPT + want]))[0, -1].argmax()))
    config = GenerationConfig(max_new_tokens=8, eos_token_ids=[])
    assert generate(from_pretrained(target), [PROMPT], config)[0].token_ids == want
    llm = LLM(str(target), dtype="float32", memory_gb=0.01)  # the native decode step
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert list(out[0].outputs[0].token_ids) == want


@pytest.mark.parametrize("flags", [["--lm-head", "int8"], ["--ignore", ""],
                                   ["--lm-head", "int8", "--embedding", "int8"]])
def test_quantize_unties_a_tied_head_it_quantizes(tmp_path, flags):
    """A tied checkpoint stores the table once; quantizing the head writes the head's own copy
    of it and tie_word_embeddings false, which transformers and bamba read with the logits of
    the weights stored; the tied source keeps its head when neither is asked for."""
    from conftest import hf_logits, hf_model, load_hf

    source = tmp_path / "tied"
    hf_model("hybrid", tie_word_embeddings=True).save_pretrained(source)
    assert "lm_head.weight" not in load_file(source / "model.safetensors")
    target = tmp_path / "q"
    assert main(["quantize", str(source), str(target), "--scheme", "int8", "--no-progress",
                 *flags]) == 0
    config = json.loads((target / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert "lm_head.weight_packed" in load_file(target / "model.safetensors")
    model = from_pretrained(target)
    table = from_pretrained(source).model.embed_tokens.weight
    head_weight = model.lm_head.dequantized_weight(torch.float32)
    assert (head_weight - table).abs().max() <= table.abs().max() / 127  # int8 of the table
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    if "--embedding" not in flags:  # transformers cannot load quantized embeddings
        with torch.no_grad():
            assert (model(ids) - hf_logits(load_hf(target), ids)).abs().max() < 1e-3
    untouched = tmp_path / "kept"
    assert main(["quantize", str(source), str(untouched), "--scheme", "int8",
                 "--no-progress"]) == 0
    assert json.loads((untouched / "config.json").read_text())["tie_word_embeddings"] is True
    assert not any(k.startswith("lm_head") for k in load_file(untouched / "model.safetensors"))


def test_export_gguf_of_a_quantized_checkpoint_writes_its_dequantized_weights(checkpoints,
                                                                              tmp_path,
                                                                              monkeypatch):
    pytest.importorskip("gguf")
    from bamba.gguf.export import export_gguf
    from bamba.quant.apply import dequantize_model

    directory = checkpoints["int8-head-int4-embeddings"]
    quantized = from_pretrained(directory)
    with pytest.raises(ValueError, match="export_gguf takes a dense model"):
        export_gguf(quantized, None, tmp_path / "x.gguf", "f32")
    with monkeypatch.context() as patch:  # a weight at a time, never the whole model dense
        patch.setattr("bamba.quant.apply.dequantize_model", lambda *a: pytest.fail("whole"))
        assert main(["export-gguf", str(directory), str(tmp_path / "m.gguf"), "--dtype",
                     "f32"]) == 0
    back = from_pretrained(tmp_path / "m.gguf")
    dense = dequantize_model(from_pretrained(directory), torch.float32)
    assert not [m for m in dense.modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))]
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        want = quantized(ids)
        assert torch.equal(dense(ids), want)
        torch.testing.assert_close(back(ids), want, atol=1e-4, rtol=0)
