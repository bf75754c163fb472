"""IBM's Granite 4.0 hybrids (transformers' GraniteMoeHybridForCausalLM) in bamba, against
transformers on checkpoints transformers itself made: the multipliers on the embeddings,
residual branches, attention scores and logits, attention with and without rotary positions,
the fused shared MLP, experts beside it; cached decode, the native kernels, the engine, saving
back for transformers, quantizing, fine-tuning, and one-line errors for configs that do not fit.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import hf_logits, load_hf, random_ids
from test_parity import assert_logits_close, run_in_pieces

from bamba.checkpoint import from_pretrained, save_pretrained
from bamba.cli import main as bamba_main
from bamba.config import BambaConfig
from bamba.engine import LLM, SamplingParams
from bamba.generation import GenerationConfig, generate
from bamba.model import FusedMLP
from bamba.native import accelerate, decode_ops

KINDS = ["granite", "granite-rope", "granite-moe"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("length", [1, 7, 8, 19])
def test_logits_equal_transformers(make_hf_checkpoint, kind, length):
    directory = make_hf_checkpoint(kind)
    ids = random_ids(2, length, seed=length)
    model = from_pretrained(directory)
    assert model.config.model_type == "granitemoehybrid"
    assert isinstance(model.model.layers[0].feed_forward, FusedMLP)
    with torch.no_grad():
        assert_logits_close(model(ids), hf_logits(load_hf(directory), ids))


def test_the_multipliers_and_positions_are_read_from_the_config(make_hf_checkpoint):
    config = from_pretrained(make_hf_checkpoint("granite")).config
    assert (config.embedding_multiplier, config.residual_multiplier, config.logits_scaling,
            config.attention_multiplier) == (12.0, 0.22, 2.5, 0.0078125)
    assert config.attn_layer_indices == [1, 3] and config.intermediate_size == 48
    assert config.position_embedding_type == "nope" and not config.uses_rope
    assert from_pretrained(make_hf_checkpoint("granite-rope")).config.uses_rope


@pytest.mark.parametrize("kind", KINDS)
def test_cached_decode_token_by_token_equals_transformers(make_hf_checkpoint, kind):
    directory = make_hf_checkpoint(kind)
    ids = random_ids(2, 21, seed=3)
    model = from_pretrained(directory)
    assert_logits_close(run_in_pieces(model, ids, [11] + [1] * 10),
                        hf_logits(load_hf(directory), ids))


@pytest.mark.parametrize("kind", KINDS)
def test_native_kernels_equal_the_torch_path(make_hf_checkpoint, monkeypatch, kind):
    """accelerate() on a Granite model: the prefill through the kernels that fit, each decode
    token through every layer in one native call (the fused MLP's halves, the residual and
    score multipliers, no rotary positions for "granite", the router's picks and the experts'
    weighted sum for "granite-moe")."""
    directory = make_hf_checkpoint(kind)
    ids = random_ids(2, 21, seed=4)
    reference = from_pretrained(directory)
    fast = accelerate(from_pretrained(directory))
    calls = []
    real = decode_ops.decode_layers
    monkeypatch.setattr(decode_ops, "decode_layers",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    pieces = [11] + [1] * 10
    assert_logits_close(run_in_pieces(fast, ids, pieces), run_in_pieces(reference, ids, pieces))
    assert len(calls) == 10


@pytest.mark.parametrize("kind", ["granite", "granite-moe"])
def test_generate_and_the_engine_agree_with_transformers_greedy(make_hf_checkpoint, kind):
    directory = make_hf_checkpoint(kind, seed=2)
    hf = load_hf(directory)
    prompt = random_ids(1, 9, seed=5)
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=12, do_sample=False,
                               attention_mask=torch.ones_like(prompt))[0, 9:].tolist()
    model = accelerate(from_pretrained(directory))
    config = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    assert generate(model, prompt.tolist(), config)[0].token_ids == expected
    llm = LLM(model, memory_gb=0.05)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    assert llm.generate([prompt[0].tolist()], params)[0].outputs[0].token_ids == expected


@pytest.mark.parametrize("kind", KINDS)
def test_saved_by_bamba_loads_in_transformers(make_hf_checkpoint, tmp_path, kind):
    directory = make_hf_checkpoint(kind)
    ids = random_ids(2, 15, seed=6)
    save_pretrained(from_pretrained(directory), tmp_path / "resaved")
    raw = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert raw["architectures"] == ["GraniteMoeHybridForCausalLM"]
    reloaded = load_hf(tmp_path / "resaved")
    assert type(reloaded).__name__ == "GraniteMoeHybridForCausalLM"
    assert_logits_close(hf_logits(reloaded, ids), hf_logits(load_hf(directory), ids))


@pytest.mark.parametrize("experts", [{}, dict(num_local_experts=8, num_experts_per_tok=3,
                                               expert_intermediate_size=24)])
def test_config_round_trips_through_config_json(experts):
    config = BambaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, attn_layer_indices=[1],
                         mamba_n_heads=4, mamba_d_state=8, model_type="granitemoehybrid",
                         embedding_multiplier=6.0, residual_multiplier=0.5, logits_scaling=4.0,
                         attention_multiplier=0.1, position_embedding_type="nope",
                         partial_rotary_factor=1.0, **experts)
    assert BambaConfig.from_hf_dict(config.to_hf_dict()) == config


@pytest.mark.parametrize("kind", ["granite", "granite-moe"])
def test_int4_quantized_granite_gives_transformers_logits(make_hf_checkpoint, tmp_path, kind):
    """`bamba quantize` on a Granite checkpoint: the fused shared MLP, the Mamba and attention
    projections become int4 linears (the routers stay as stored); transformers (with
    compressed-tensors) reads the file and gives our logits. transformers does not read
    quantized experts (per-expert linears, ``test_quant_experts``): kept dense by --ignore."""
    source = make_hf_checkpoint(kind, hidden_size=128, intermediate_size=128,
                                shared_intermediate_size=128, mamba_d_head=64)
    target = tmp_path / "int4"
    assert bamba_main(["quantize", str(source), str(target), "--scheme", "int4",
                       "--group-size", "32", "--no-progress",
                       "--ignore", r"lm_head,re:.*block_sparse_moe\.experts\."]) == 0
    quantized = from_pretrained(target)
    feed_forward = quantized.model.layers[0].feed_forward
    assert type(feed_forward.input_linear).__name__ == "QuantizedLinear"
    if kind == "granite-moe":
        assert type(feed_forward.experts.router.layer) is torch.nn.Linear
        assert type(feed_forward.experts.input_linear).__name__ == "ExpertWeights"
    ids = random_ids(2, 13, seed=7)
    with torch.no_grad():
        ours = quantized(ids)
    assert_logits_close(hf_logits(load_hf(target), ids), ours, atol=1e-3)


@pytest.mark.parametrize("field, value, fragment", [
    ("num_experts_per_tok", 5, "num_local_experts 4 needs num_experts_per_tok in 1..4"),
    ("layer_types", ["mamba", "conv", "mamba", "mamba"], "layer_types must list"),
    ("position_embedding_type", "alibi", "position_embedding_type 'alibi'"),
])
def test_unsupported_granite_configs_are_one_line_errors(make_hf_checkpoint, capsys, field,
                                                         value, fragment):
    directory = make_hf_checkpoint("granite-moe", tokenizer=True)
    raw = json.loads((directory / "config.json").read_text())
    raw[field] = value
    (directory / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=fragment):
        from_pretrained(directory)
    capsys.readouterr()
    assert bamba_main(["generate", "--model", str(directory), "--prompt", "x",
                       "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("kind", ["granite", "granite-moe"])
def test_finetune_from_a_granite_checkpoint_exports_granite(make_hf_checkpoint, tmp_path,
                                                            capsys, kind):
    """`bamba finetune` on a Granite checkpoint trains it (multipliers and fused MLP under
    autograd) and exports a Granite checkpoint that transformers loads with bamba's logits."""
    import argparse

    from bamba.cli.finetune import run as finetune

    source = make_hf_checkpoint(kind, hidden_size=64, intermediate_size=64,
                                shared_intermediate_size=64, mamba_d_head=32)
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"prompt": "add 2 and 2", "completion": " 4"}) + "\n")
    args = argparse.Namespace(config=None, overrides=[
        f"--init_from={source}", f"--data_path={data}", "--steps=3", "--warmup_steps=1",
        "--seq_len=32", "--batch_size=2", f"--out_dir={tmp_path / 'ft'}", "--progress=false"])
    assert finetune(args) == 0
    assert "step 3: loss" in capsys.readouterr().out
    tuned = from_pretrained(tmp_path / "ft" / "hf")
    start = from_pretrained(source)
    assert tuned.config == start.config
    assert not torch.equal(tuned.model.layers[0].feed_forward.input_linear.weight,
                           start.model.layers[0].feed_forward.input_linear.weight)
    ids = random_ids(1, 12)
    with torch.no_grad():
        assert_logits_close(tuned(ids), hf_logits(load_hf(tmp_path / "ft" / "hf"), ids))


@pytest.mark.parametrize("kind", KINDS)
def test_the_analysis_counts_every_parameter(make_hf_checkpoint, capsys, kind):
    """parameter_count (memory budgets rest on it) counts a Granite model's parameters, its
    experts too, and `bamba analyze` prices each kind (routed reads: ``test_analyze``)."""
    from bamba.analyze import parameter_count

    directory = make_hf_checkpoint(kind)
    model = from_pretrained(directory)
    assert parameter_count(model.config) == sum(p.numel() for p in model.parameters())
    capsys.readouterr()
    assert bamba_main(["analyze", str(directory)]) == 0
    assert ("experts: 2 of 4 a token" in capsys.readouterr().out) == (kind == "granite-moe")


def test_rope_scaling_on_a_model_without_rotary_positions_is_a_one_line_error(
        make_hf_checkpoint, capsys):
    directory = make_hf_checkpoint("granite")
    with pytest.raises(ValueError, match="no rotary positions"):
        from_pretrained(directory, rope_scaling={"rope_type": "yarn", "factor": 4})
    capsys.readouterr()
    assert bamba_main(["generate", "--model", str(directory), "--prompt", "x",
                       "--max-new-tokens", "1", "--rope-scaling",
                       '{"rope_type": "yarn", "factor": 4}']) == 2
    err = capsys.readouterr().err.strip()
    assert "no rotary positions" in err and len(err.splitlines()) == 1
    assert from_pretrained(make_hf_checkpoint("granite-rope"), rope_scaling={
        "rope_type": "yarn", "factor": 4}).config.context_length == 4 * 512


def test_training_from_scratch_initialises_the_stacked_experts_at_random():
    """init_weights gives a MoE's stacked expert matrices the matrices' normal init (the
    down projections the scaled residual one), not the norms' ones; the 3-D conv keeps its
    uniform one."""
    from bamba.config import preset
    from bamba.model import BambaLM, init_weights

    config = preset("bench-granite-moe", num_hidden_layers=2, attn_layer_indices=[1])
    model = init_weights(BambaLM(config), seed=0)
    conv = model.model.layers[0].mamba.conv1d.weight  # 3-D too, but its own uniform rule
    assert conv.abs().max() <= conv.shape[-1] ** -0.5
    experts = model.model.layers[0].feed_forward.experts
    std = config.initializer_range
    assert abs(experts.input_linear.weight.std().item() - std) < 0.05 * std
    residual = std / (2 * config.num_hidden_layers) ** 0.5
    assert abs(experts.output_linear.weight.std().item() - residual) < 0.05 * residual
