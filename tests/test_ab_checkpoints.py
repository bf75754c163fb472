"""benchmarks/ab_checkpoints.py at its smallest: every checkpoint is timed in every turn, the
order flipping each turn, and the results (with the host) are written. Nothing timed is
asserted beyond being positive."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import ab_checkpoints  # noqa: E402
from serve_helpers import save_tiny_checkpoint  # noqa: E402


def test_checkpoints_take_turns_and_are_written(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = save_tiny_checkpoint(tmp_path / "a"), save_tiny_checkpoint(tmp_path / "b")
    order = []
    real = ab_checkpoints.prefill_seconds
    monkeypatch.setattr(ab_checkpoints, "prefill_seconds",
                        lambda model, length: order.append(id(model)) or real(model, length))
    out = tmp_path / "ab.json"
    ab_checkpoints.main([str(first), str(second), "--turns", "3", "--steps", "2", "--prompt",
                         "8", "--batches", "1", "3", "--output", str(out)])
    assert order[0] == order[3] == order[4] and order[1] == order[2] == order[5] != order[0]
    written = json.loads(out.read_text())
    assert written["host"]["read_gb_per_s"] > 0
    assert json.loads(capsys.readouterr().out) == written["results"]
    for path in (first, second):
        row = written["results"][str(path)]
        assert row["disk_mb"] > 0 and row["decode_b1_tok_s"] > 0 and row["prefill_8_tok_s"] > 0
        assert row["model_mb"] > 0
        assert row["decode_b3_tok_s"] > 0 and "decode_b8_tok_s" not in row


def _with_second_entry(path: Path, flag: str, label: str, tmp_path: Path) -> tuple[dict, dict]:
    """The written rows of one short run over ``path`` with ``flag``: the file's own, then the
    second entry the flag adds (named "PATH (label)")."""
    out = tmp_path / "ab.json"
    ab_checkpoints.main([str(path), "--turns", "1", "--steps", "1", "--prompt", "8",
                         "--batches", "1", flag, "--output", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert list(rows) == [str(path), f"{path} ({label})"]
    return rows[str(path)], rows[f"{path} ({label})"]


def test_dense_experts_add_each_checkpoint_with_its_experts_in_bf16(tmp_path: Path) -> None:
    """--dense-experts: a second entry a checkpoint, its experts a dense bf16 stack holding
    more bytes than the quantized ones."""
    from conftest import build_tokenizer, hf_model

    from bamba.cli import main as bamba_main

    hf_model("granite-moe", hidden_size=128, intermediate_size=128, shared_intermediate_size=128,
             mamba_d_head=64).save_pretrained(tmp_path / "source")
    build_tokenizer().save_pretrained(tmp_path / "source")
    int4 = tmp_path / "int4"
    assert bamba_main(["quantize", str(tmp_path / "source"), str(int4), "--scheme", "int4",
                       "--group-size", "32", "--no-progress"]) == 0
    quantized, dense = _with_second_entry(int4, "--dense-experts", "experts bf16", tmp_path)
    assert quantized["disk_mb"] == dense["disk_mb"]
    assert dense["model_mb"] > quantized["model_mb"]


@pytest.mark.slow
def test_llama_bench_takes_a_turn_on_each_gguf_file(make_hf_checkpoint, tmp_path: Path) -> None:
    """--llama-bench: llama.cpp's decode and prefill of each GGUF file, in every turn, beside
    bamba's (directories get none)."""
    import llama_cpp
    from measure import run_llama_bench

    from bamba.checkpoint import from_pretrained, load_tokenizer
    from bamba.gguf.export import export_gguf

    llama_cpp.find_or_build(tool="llama-bench")
    source = make_hf_checkpoint("hybrid")
    gguf = export_gguf(from_pretrained(source), load_tokenizer(source), tmp_path / "m.gguf",
                       "q8_0")
    out = tmp_path / "ab.json"
    ab_checkpoints.main([str(source), str(gguf), "--turns", "2", "--steps", "4", "--prompt",
                         "16", "--batches", "1", "--llama-bench", "--output", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert "llama_cpp_decode_b1_tok_s" not in rows[str(source)]
    alone, _ = run_llama_bench(gguf, 2, ["-p", "16", "-n", "4", "-r", "1"])  # its own figures
    for key, figure in (((0, 4, 0), "llama_cpp_decode_b1_tok_s"),
                        ((16, 0, 0), "llama_cpp_prefill_16_tok_s")):
        assert 0.2 < rows[str(gguf)][figure] / alone[key]["tok_s"] < 5, figure


def test_flat_scales_add_each_gguf_file_with_its_k_tables_as_float32(tmp_path: Path,
                                                                      monkeypatch) -> None:
    """--flat-scales: a second entry a file, its Q4_K tables expanded to float32 scales and
    offsets, its Q6_K ones to float32 scales: the same weights bit for bit, more bytes held."""
    import torch
    from gguf import GGMLQuantizationType as Q
    from test_gguf import _file_with_random_blocks

    from bamba.checkpoint import from_pretrained

    k_types = {"ffn_up.weight": Q.Q4_K, "ffn_down.weight": Q.Q6_K}
    path = _file_with_random_blocks(tmp_path, monkeypatch, lambda name, shape: k_types.get(
        name.split(".", 2)[-1]), size=0.03)
    model = from_pretrained(path, dtype=torch.float32)
    flat = ab_checkpoints.flat_scales(from_pretrained(path, dtype=torch.float32))
    for name, offsets in (("up_proj", True), ("down_proj", False)):
        held, expanded = (m.model.layers[0].feed_forward.get_submodule(name)
                          for m in (model, flat))
        assert held.scheme.two_level and not expanded.scheme.two_level
        assert expanded.scheme.offsets == offsets
        table = expanded.weight_table if offsets else expanded.weight_scale
        assert table.dtype == torch.float32
        assert torch.equal(expanded.dequantized_weight(torch.float32),
                           held.dequantized_weight(torch.float32))
    tables, floats = _with_second_entry(path, "--flat-scales", "flat scales", tmp_path)
    assert floats["model_mb"] > tables["model_mb"]


def test_int8_values_add_each_file_with_its_nibbles_and_six_bits_as_int8(tmp_path: Path,
                                                                          monkeypatch) -> None:
    """--int8-values: a second entry a file that holds IQ4 nibbles (IQ4_NL, IQ4_XS) or 6- or
    5-bit values (Q6_K, Q5_K), its weights int8 values (of their levels; Q6_K's and Q5_K's
    under their K tables): the
    same weights bit for bit, more bytes held; a file with neither gets none."""
    import torch
    from gguf import GGMLQuantizationType as Q
    from test_gguf import _file_with_random_blocks

    from bamba.checkpoint import from_pretrained
    from bamba.quant.formats import make_scheme

    types = {"ffn_up.weight": Q.IQ4_NL, "ffn_down.weight": Q.IQ4_XS, "ffn_gate.weight": Q.Q6_K,
             "ssm_in.weight": Q.Q5_K}
    path = _file_with_random_blocks(tmp_path, monkeypatch, lambda name, shape: types.get(
        name.split(".", 2)[-1]), size=0.03)
    model = from_pretrained(path, dtype=torch.float32)
    int8 = ab_checkpoints.int8_values(from_pretrained(path, dtype=torch.float32))
    q5_k = make_scheme("int8", 32, symmetric=False, offsets=True, two_level=True)
    for name, scheme in (("feed_forward.up_proj", make_scheme("int8", 32)),
                         ("feed_forward.down_proj", make_scheme("int8", 32)),
                         ("feed_forward.gate_proj", make_scheme("int8", 16, two_level=True)),
                         ("mamba.in_proj", q5_k)):  # (Q6_K's and Q5_K's K tables)
        held, expanded = (m.model.layers[0].get_submodule(name) for m in (model, int8))
        assert held.scheme.levels or held.scheme.held_bits
        assert expanded.scheme == scheme
        assert torch.equal(expanded.dequantized_weight(torch.float32),
                           held.dequantized_weight(torch.float32))
    nibbles, bytes_ = _with_second_entry(path, "--int8-values", "int8 values", tmp_path)
    assert bytes_["model_mb"] > nibbles["model_mb"]
    plain = save_tiny_checkpoint(tmp_path / "plain")
    out = tmp_path / "plain.json"
    ab_checkpoints.main([str(plain), "--int8-values", "--turns", "1", "--steps", "1",
                         "--prompt", "8", "--batches", "1", "--output", str(out)])
    assert list(json.loads(out.read_text())["results"]) == [str(plain)]


def test_dense_table_adds_each_file_with_its_tied_table_in_bf16(tmp_path: Path) -> None:
    """--dense-table: a second entry a file, its quantized token table (which the tied head
    reads) a bf16 table shared by the head: more bytes held."""
    import torch
    from conftest import build_tokenizer, hf_model

    from bamba.checkpoint import from_pretrained, load_tokenizer
    from bamba.gguf.export import export_gguf
    from bamba.quant.apply import dequantize_model
    from bamba.quant.embedding import QuantizedEmbedding

    source = tmp_path / "source"
    hf_model("granite", hidden_size=64, intermediate_size=128, shared_intermediate_size=128,
             mamba_d_head=32, tie_word_embeddings=True, vocab_size=8192).save_pretrained(source)
    build_tokenizer().save_pretrained(source)
    path = export_gguf(from_pretrained(source), load_tokenizer(source), tmp_path / "t.gguf",
                       "q8_0")
    dense = dequantize_model(from_pretrained(path), torch.float32, kinds=(QuantizedEmbedding,))
    assert dense.lm_head.weight is dense.model.embed_tokens.weight
    quantized, table = _with_second_entry(path, "--dense-table", "table bf16", tmp_path)
    assert table["model_mb"] > quantized["model_mb"]
