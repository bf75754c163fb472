"""The arithmetic-intensity model: exact counts against real modules and hand arithmetic, the
appendix's figures, and the ``bamba analyze`` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bamba import analyze as az
from bamba import cli
from bamba.cache import ContiguousCache
from bamba.config import BambaConfig, llama_twin, preset
from bamba.model import BambaLM

BF16_FP32 = az.Precision(weights="bfloat16", kv="bfloat16", state="float32")

VARIANTS = {
    "tiny": preset("tiny"),
    "bench": preset("bench"),
    "bamba-9b": preset("bamba-9b"),
    "groups-biases-tied": preset("tiny", mamba_n_groups=4, mamba_proj_bias=True,
                                 mamba_conv_bias=False, attention_bias=True, mlp_bias=True,
                                 tie_word_embeddings=True),
    "wide-heads": preset("tiny", head_dim=96, num_attention_heads=6, num_key_value_heads=3),
    "all-mamba": preset("tiny", attn_layer_indices=[]),
}


def _meta_model(config: BambaConfig) -> BambaLM:
    with torch.device("meta"):
        return BambaLM(config)


# ---- parameters ------------------------------------------------------------------------------
@pytest.mark.parametrize("twin", [False, True], ids=["hybrid", "twin"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_parameter_count_equals_meta_model(name, twin):
    config = llama_twin(VARIANTS[name]) if twin else VARIANTS[name]
    model = _meta_model(config)
    assert az.parameter_count(config) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["tiny", "groups-biases-tied", "wide-heads"])
def test_layer_params_name_every_tensor_of_each_layer(name):
    config = VARIANTS[name]
    model = _meta_model(config)
    for idx, kind in enumerate(config.layer_types):
        actual = {n: p.numel() for n, p in model.model.layers[idx].named_parameters()}
        assert az.layer_params(config, kind) == actual


def test_parameter_count_equals_transformers_models():
    from conftest import hf_model

    for kind in ("hybrid", "llama"):
        reference = hf_model(kind)
        config = BambaConfig.from_hf_dict(reference.config.to_dict())
        assert az.parameter_count(config) == sum(p.numel() for p in reference.parameters())


def test_bamba_9b_mamba_mixer_by_hand():
    # in_proj 4096 x (8192 z + 8448 xBC + 128 dt); conv 8448 x 4 + 8448 bias; dt_bias, A_log, D
    # 3 x 128; norm 8192; out_proj 8192 x 4096: about 6.1 h² against the appendix's ~5 h².
    per_layer = 4096 * 16768 + 8448 * 5 + 3 * 128 + 8192 + 8192 * 4096
    assert az.param_breakdown(preset("bamba-9b"))["mamba"] == 29 * per_layer == 2_966_322_304
    assert az.parameter_count(preset("bamba-9b")) == 9_780_235_392


# ---- a small model by hand -------------------------------------------------------------------
SMALL = BambaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, attn_layer_indices=[0],
                    mamba_n_heads=4, mamba_d_head=32, mamba_d_state=8, mamba_n_groups=1,
                    mamba_d_conv=4, mamba_chunk_size=4)
# attention: q 64*64 + k 64*32 + v 64*32 + o 64*64 = 12288
# mamba: in_proj 64*(128 + 144 + 4) = 17664, conv 144*4 + 144, dt_bias/A_log/D 12, norm 128,
#        out_proj 128*64 = 8192 -> 26716;  mlp 3*64*128 = 24576 per layer
# norms 2*2*64 + 64 = 320; embedding = lm_head = 6400


def test_small_model_parameters_by_hand():
    assert az.param_breakdown(SMALL) == {"embedding": 6400, "lm_head": 6400, "attention": 12288,
                                         "mamba": 26716, "mlp": 49152, "norms": 320}
    assert az.parameter_count(llama_twin(SMALL)) == 6400 * 2 + 2 * 12288 + 49152 + 320


def test_small_model_decode_step_by_hand():
    cost = az.decode_cost(SMALL, b=2, s=10, precision=BF16_FP32)
    linear = 2 * 2 * (12288 + 17664 + 8192 + 49152 + 6400)  # 2 FLOPs x 2 rows x matmul weights
    attention = 4 * 2 * 1 * 10 * 4 * 16  # 4 b q s H D
    conv, ssd = 2 * 2 * 4 * 144, 5 * 2 * 4 * 32 * 8  # 2 b K conv_dim; 5 b H P N
    assert cost.flops == linear + attention + conv + ssd == 392_448
    assert cost.weight_bytes == (101_276 - 6400 + 2 * 64) * 2  # head read, embedding rows gathered
    assert cost.kv_bytes == 2 * 11 * (2 * 2 * 16) * 2  # b (s+1) [K,V] Hkv D bf16
    assert cost.state_bytes == 2 * 2 * (3 * 144 + 4 * 32 * 8) * 4  # read+write, b, fp32
    assert az.kv_bytes_per_token(SMALL, BF16_FP32) == 128
    assert az.state_bytes_per_sequence(SMALL, BF16_FP32) == 5824


def test_small_model_prefill_by_hand():
    cost = az.prefill_cost(SMALL, b=2, s=10, precision=BF16_FP32)
    linear = 2 * 20 * (12288 + 17664 + 8192 + 49152) + 2 * 2 * 6400  # head: last token only
    attention = 4 * 2 * 10 * 10 * 4 * 16
    conv = 2 * 20 * 4 * 144
    # 3 chunks of 4 (12 padded steps); G N = 8, H P = 128, H P N = 1024
    ssd = 2 * (2 * 12 * 4 * (8 + 128) + 4 * 12 * 1024 + 2 * 3 * 1024)
    assert cost.flops == linear + attention + conv + ssd == 3_728_384
    assert (cost.weight_bytes, cost.kv_bytes, cost.state_bytes) == \
        ((94_876 + 20 * 64) * 2, 20 * 128, 2 * 2 * 5824)


def test_linear_and_scan_flops_match_torch_flop_counter():
    config = preset("tiny", num_hidden_layers=4, attn_layer_indices=[1], mamba_n_groups=2,
                    mamba_chunk_size=16)
    model = BambaLM(config).eval()
    b, s = 2, 20
    ids = torch.randint(0, config.vocab_size, (b, s))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids, logits_to_keep=1)  # no cache: the CPU attention kernel is not counted
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    # the LM head's 2 rows may run in bamba.native's few-row kernel (it registers its FLOPs)
    linear = counts["aten.mm"] + counts.get("bamba.linear_rows", 0)
    assert linear == az.linear_flops(config, b * s, logit_tokens=b)
    terms = az.ssd_prefill_terms(config, s)
    # every scan step is a batched matmul except the elementwise chunk-to-chunk pass
    assert counts["aten.bmm"] == 3 * b * (sum(terms.values()) - terms["state_pass"])

    cache = ContiguousCache(config, b, 32, torch.float32)
    with torch.no_grad():
        model(ids[:, :-1], cache=cache, logits_to_keep=1)
        with FlopCounterMode(display=False) as counter:
            model(ids[:, -1:], positions=torch.full((b, 1), s - 1), cache=cache)
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    decode_linear = sum(counts.get(op, 0) for op in (  # torch ops, or bamba.native's kernels
        "aten.mm", "bamba.linear_rows", "bamba.mamba_layer_step", "bamba.attention_in_step",
        "bamba.attention_out_step"))
    assert decode_linear == az.linear_flops(config, b, logit_tokens=b)


def test_decode_bytes_are_affine_in_context_and_crossover_is_tight():
    for name in ("bench", "bamba-9b", "tiny"):
        config, twin = VARIANTS[name], llama_twin(VARIANTS[name])
        for b in (1, 8, 64):
            s = az.crossover_length(config, b, BF16_FP32)
            assert s is not None and s > 0
            assert az.decode_cost(config, b, s, BF16_FP32).bytes < \
                az.decode_cost(twin, b, s, BF16_FP32).bytes
            assert az.decode_cost(config, b, s - 1, BF16_FP32).bytes >= \
                az.decode_cost(twin, b, s - 1, BF16_FP32).bytes


def test_crossover_edge_cases():
    same = llama_twin(preset("tiny"))  # the twin of an all-attention model is itself
    assert az.crossover_length(same, 4, BF16_FP32) is None
    assert az.decode_speedup(same, 4, 1000, BF16_FP32) == 1.0
    # wide attention heads make the twin heavier than the hybrid even with no context
    heavy = preset("tiny", num_attention_heads=8, num_key_value_heads=8, head_dim=256)
    assert az.crossover_length(heavy, 1, BF16_FP32) == 0
    assert az.decode_speedup(heavy, 1, 0, BF16_FP32) > 1.0


def test_precision_and_bad_arguments():
    assert az.Precision("bf16", "fp8", "fp32") == az.Precision("bfloat16", "float8", "float32")
    with pytest.raises(ValueError, match="unknown dtype"):
        az.Precision(weights="float13")
    with pytest.raises(ValueError, match="batch"):
        az.decode_cost(SMALL, 0, 10, BF16_FP32)
    with pytest.raises(ValueError, match="sequence length"):
        az.prefill_cost(SMALL, 1, -1, BF16_FP32)


# ---- the appendix ----------------------------------------------------------------------------
def test_appendix_formulas_by_hand():
    shape = az.AppendixShape(h=8, l=4, l_attn=1, d=4)  # l_ssd 3
    t = az.appendix_elements(shape, b=2, s=3)
    assert t["attention"] == {"model_size": 13 * 64 * 4,
                              "prefill_compute": 26 * 6 * 64 * 4 + 4 * 2 * 9 * 8 * 4,
                              "prefill_memory": 3328 + 0.5 * 6 * 8 * 4,
                              "decode_compute": 26 * 2 * 64 * 4 + 4 * 6 * 8 * 4,
                              "decode_memory": 3328 + 96}
    assert t["bamba"]["model_size"] == 3968
    assert t["bamba"]["decode_memory"] == 3968 + 0.5 * 6 * 8 + 4 * 2 * 4 * 8 * 3 == 4760
    assert t["bamba"]["prefill_compute"] == 31 * 6 * 64 * 4 + 4 * 2 * 9 * 8 + 4 * 6 * 4 * 8 * 3
    assert az.appendix_decode_speedup(shape, 2, 3) == pytest.approx(3424 / 4760)


@pytest.mark.parametrize("b,s,ratio,tol", [(32, 1024, 0.95, 0.005), (8, 4096, 1.75, 0.005),
                                           (32, 8192, 3.9, 0.05), (32, 16384, 5.7, 0.05)])
def test_appendix_figures_for_the_bench_shape(b, s, ratio, tol):
    shape = az.appendix_shape(preset("bench"))
    assert shape == az.AppendixShape(h=512, l=32, l_attn=3, d=128)  # d: SSD state, not head dim
    assert az.appendix_decode_speedup(shape, b, s) == pytest.approx(ratio, abs=tol)


def test_appendix_predicts_5x_for_bamba_9b_beyond_16k():
    shape = az.appendix_shape(preset("bamba-9b"))
    assert shape == az.AppendixShape(h=4096, l=32, l_attn=3, d=128)
    assert az.appendix_decode_speedup(shape, 128, 16384) == pytest.approx(5.0, abs=0.05)
    for b, s in ((64, 32768), (32, 65536)):  # the same 2M tokens in flight, longer contexts
        assert 5.0 < az.appendix_decode_speedup(shape, b, s) < 6.5
    ratios = [az.appendix_decode_speedup(shape, 128, s) for s in (16384, 32768, 65536, 1 << 20)]
    assert ratios == sorted(ratios) and ratios[-1] < 32 / 3  # bounded by l / l_attn


def test_exact_model_predicts_about_5x_for_bamba_9b_at_long_context():
    config = preset("bamba-9b")
    for b, s in ((64, 32768), (32, 65536), (128, 32768)):
        assert 4.5 < az.decode_speedup(config, b, s, BF16_FP32) < 6.0
    # a float32 state costs the hybrid: with a bf16 state the exact ratio is higher
    bf16_state = az.Precision(state="bfloat16")
    assert az.decode_speedup(config, 128, 16384, bf16_state) > \
        az.decode_speedup(config, 128, 16384, BF16_FP32) + 0.5


def test_exact_terms_that_match_the_appendix():
    """Where the appendix's assumptions hold exactly (Bamba-9B), the exact terms equal its
    element counts times the dtype size; the remaining gap is the mixer, head and conv state."""
    config, b, s = preset("bamba-9b"), 16, 8192
    h, l, la, ls, d = 4096, 32, 3, 29, 128
    twin = llama_twin(config)
    twin_layers = az.parameter_count(twin) - 2 * config.vocab_size * h - (2 * l + 1) * h
    assert twin_layers == 13 * h * h * l
    dec = az.decode_cost(config, b, s, BF16_FP32)
    assert dec.kv_bytes - b * az.kv_bytes_per_token(config, BF16_FP32) == 0.5 * b * s * h * la * 2
    conv = 2 * b * ls * 3 * config.conv_dim * 4
    assert dec.state_bytes - conv == 4 * b * d * h * ls * 4


# ---- the command -----------------------------------------------------------------------------
def _run(monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    # only this verb: other verbs' modules may not exist in a partial tree
    monkeypatch.setattr(cli, "COMMANDS", {"analyze": cli.COMMANDS["analyze"]})
    code = cli.main(["analyze", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_table_on_a_preset(monkeypatch, capsys):
    code, out, _ = _run(monkeypatch, capsys, "bench", "--batch", "8", "32", "--seq", "4K", "16384")
    assert code == 0
    assert "bench: 32 layers (3 attention, 29 Mamba2)" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["8"], ["32"])]
    assert [r[:2] for r in rows] == [["8", "4K"], ["8", "16K"], ["32", "4K"], ["32", "16K"]]
    expected = az.decode_speedup(preset("bench"), 32, 16384, BF16_FP32)
    assert f"{expected:.2f}x" in rows[-1] and "5.68x" in rows[-1]


def test_cli_json_from_a_saved_config_and_directory(monkeypatch, capsys, tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps(preset("bamba-9b").to_hf_dict()))
    results = []
    for spec in (str(tmp_path / "config.json"), str(tmp_path), "bamba-9b"):
        code, out, _ = _run(monkeypatch, capsys, spec, "--batch", "64", "--seq", "32K", "--json",
                            "--state-dtype", "bf16")
        assert code == 0
        results.append(json.loads(out))
    data = results[0]
    assert data["precision"] == {"weights": "bfloat16", "kv": "bfloat16", "state": "bfloat16"}
    assert data["parameters"]["hybrid"]["total"] == 9_780_235_392
    (row,) = data["rows"]
    assert row["decode_speedup"] == pytest.approx(
        az.decode_speedup(preset("bamba-9b"), 64, 32768, az.Precision(state="bfloat16")))
    assert all(r["rows"] == data["rows"] for r in results)


@pytest.mark.parametrize("argv,message", [
    (["bamba-10b"], "neither a preset"),
    (["/no/such/dir/config.json"], "neither a preset"),
    (["bench", "--dtype", "float13"], "unknown dtype"),
])
def test_cli_bad_input_is_one_line_exit_2(monkeypatch, capsys, argv, message):
    code, out, err = _run(monkeypatch, capsys, *argv)
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_directory_without_config_and_bad_json(monkeypatch, capsys, tmp_path: Path):
    code, _, err = _run(monkeypatch, capsys, str(tmp_path))
    assert code == 2 and "no config.json" in err
    (tmp_path / "config.json").write_text("{not json")
    code, _, err = _run(monkeypatch, capsys, str(tmp_path))
    assert code == 2 and "not valid JSON" in err and len(err.strip().splitlines()) == 1


def test_cli_rejects_bad_counts(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _run(monkeypatch, capsys, "bench", "--seq", "0")
    assert exit_info.value.code == 2


# ---- Granite 4.0 MoE: routed weights ---------------------------------------------------------
MOE = preset("tiny", model_type="granitemoehybrid", num_local_experts=4, num_experts_per_tok=2,
             expert_intermediate_size=24, attn_layer_indices=[1])


def test_experts_touched_and_active_parameters_by_hand():
    assert az.experts_touched(MOE, 1) == 2  # a token's k experts
    assert az.experts_touched(MOE, 2) == 4 * (1 - 0.5 ** 2)
    assert az.experts_touched(MOE, 10_000) == pytest.approx(4)
    assert az.experts_touched(preset("tiny"), 5) == 0
    one_expert = 3 * 24 * MOE.hidden_size
    assert az.active_parameter_count(MOE) == \
        az.parameter_count(MOE) - MOE.num_hidden_layers * 2 * one_expert


def test_moe_decode_reads_the_router_whole_and_the_picked_experts():
    """Decode bytes: the dense model's, plus each layer's router and the experts its tokens
    pick in expectation; FLOPs: the router and k experts a token."""
    dense = MOE.replace(num_local_experts=0)
    one_expert, router = 3 * 24 * MOE.hidden_size, 4 * MOE.hidden_size
    layers = MOE.num_hidden_layers
    for b in (1, 3):
        moe_cost, dense_cost = (az.decode_cost(c, b, 10, BF16_FP32) for c in (MOE, dense))
        touched = az.experts_touched(MOE, b)
        assert moe_cost.weight_bytes - dense_cost.weight_bytes == \
            (layers * router + round(layers * touched * one_expert)) * 2
        assert moe_cost.flops - dense_cost.flops == 2 * b * layers * (router + 2 * one_expert)


def test_moe_linear_flops_match_torch_flop_counter():
    """The torch path multiplies each token's rows by its k experts only: the counted matmuls
    equal the model's routed FLOPs exactly."""
    model = BambaLM(MOE).eval()
    b, s = 2, 9
    ids = torch.randint(0, MOE.vocab_size, (b, s))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids, logits_to_keep=1)
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    assert counts["aten.mm"] + counts.get("bamba.linear_rows", 0) == \
        az.linear_flops(MOE, b * s, logit_tokens=b)


def test_analyze_a_moe_model_against_its_all_attention_twin_with_experts(capsys):
    data = az.report(MOE, [1, 8], [64], BF16_FP32, "moe")
    assert data["parameters"]["twin"]["mlp"] == data["parameters"]["hybrid"]["mlp"]
    assert data["parameters"]["twin"]["mamba"] == 0
    assert data["experts"] == {"count": 4, "per_token": 2,
                               "active_parameters": az.active_parameter_count(MOE)}
    assert data["appendix_shape"] is None
    assert all(r["appendix_decode_speedup"] is None and r["decode_speedup"] > 0
               for r in data["rows"])
    assert cli.main(["analyze", "bench-granite-moe", "--batch", "1", "--seq", "4K"]) == 0
    out = capsys.readouterr().out
    assert "experts: 6 of 32 a token" in out and "(none: the appendix has no experts)" in out


def test_cli_reads_a_gguf_files_configuration(monkeypatch, capsys, make_hf_checkpoint,
                                              tmp_path: Path):
    """A GGUF file (a Granite MoE's, experts included) is analysed as its metadata's model: the
    same report as the checkpoint it was exported from; a file that is not GGUF is one line."""
    pytest.importorskip("gguf")
    from bamba.checkpoint import from_pretrained, load_tokenizer
    from bamba.gguf.export import export_gguf

    source = make_hf_checkpoint("granite-moe")
    gguf_file = export_gguf(from_pretrained(source), load_tokenizer(source),
                            tmp_path / "m.gguf", "q8_0")
    reports = []
    for spec in (str(source), str(gguf_file)):
        code, out, _ = _run(monkeypatch, capsys, spec, "--batch", "4", "--seq", "1K", "--json")
        assert code == 0
        reports.append(json.loads(out))
    assert reports[1]["parameters"] == reports[0]["parameters"]
    assert reports[1]["rows"] == reports[0]["rows"]
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 8)
    code, _, err = _run(monkeypatch, capsys, str(tmp_path / "bad.gguf"))
    assert code == 2 and "bad.gguf" in err and len(err.strip().splitlines()) == 1
