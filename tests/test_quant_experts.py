"""A Granite 4.0 MoE hybrid's experts quantized (``bamba.quant.experts``): on disk as
llm-compressor writes them (each expert's gate_proj, up_proj and down_proj a linear of its own,
which vLLM's Granite loader reads), in memory as one quantized [E * rows, cols] stack a kernel
streams an expert's slice of. Against llm-compressor's own checkpoints (its logits recorded
with transformers + compressed-tensors), `bamba quantize`'s output, the native steps, and
one-line errors for pieces that do not fit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import random_ids
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_parity import assert_logits_close
from test_quant_interop import BF16_ATOL, bamba_greedy, file_tensors, prefill_then_decode, \
    same_bits

from bamba.checkpoint import from_pretrained, save_pretrained
from bamba.cli import main as bamba_main
from bamba.native import accelerate, decode_ops, dispatch, quant_ops
from bamba.quant.apply import dequantize_model
from bamba.quant.config import EXPERT_LINEARS
from bamba.quant.experts import QuantizedExpertWeights, locate_piece, piece_modules
from bamba.quant.formats import QuantScheme, quantize

FIXTURES = Path(__file__).parent / "fixtures" / "llmcompressor"
LLMCOMPRESSOR = {"granite_moe_w4a16": QuantScheme("int4", 128),
                 "granite_moe_fp8_dynamic": QuantScheme("fp8")}
# `bamba quantize` variants: flags, and the experts' scheme (the other linears' the --scheme)
OUR_SCHEMES = {"fp8": (["--scheme", "fp8"], QuantScheme("fp8")),
               "int8": (["--scheme", "int8"], QuantScheme("int8")),
               "int4": (["--scheme", "int4", "--group-size", "32"], QuantScheme("int4", 32)),
               "fp8-experts-int4": (["--scheme", "fp8", "--experts", "int4", "--group-size",
                                     "32"], QuantScheme("int4", 32))}
# widths divisible by the int4 group: hidden 128, experts and shared MLP 128 wide, 4 experts
SHAPE = dict(hidden_size=128, intermediate_size=128, shared_intermediate_size=128,
             mamba_d_head=64)


def experts_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [layer.feed_forward.experts for layer in model.model.layers]


def joined(tensors: dict[str, torch.Tensor], stacked: str, experts: int,
           leaf: str) -> torch.Tensor:
    """A stacked module's tensor ``leaf`` gathered from the per-expert pieces of a file."""
    return torch.cat([tensors[f"{m}.{leaf}"] for m in piece_modules(stacked, experts)])


# ---- llm-compressor's Granite checkpoints in bamba -------------------------------------------
@pytest.mark.parametrize("name", LLMCOMPRESSOR)
def test_llmcompressor_granite_experts_load_still_quantized_bit_for_bit(name):
    tensors = file_tensors(FIXTURES / name)
    model = from_pretrained(FIXTURES / name)
    for index, experts in enumerate(experts_of(model)):
        assert type(experts.router.layer) is torch.nn.Linear  # llm-compressor's ignore list
        for kind in ("input_linear", "output_linear"):
            held = getattr(experts, kind)
            assert isinstance(held, QuantizedExpertWeights) and held.scheme == LLMCOMPRESSOR[name]
            stacked = f"model.layers.{index}.block_sparse_moe.{kind}"
            for leaf, value in held.quantized_tensors().items():
                if leaf != "weight_shape":
                    assert same_bits(value, joined(tensors, stacked, held.experts, leaf)), leaf


@pytest.mark.parametrize("name", LLMCOMPRESSOR)
def test_llmcompressor_granite_checkpoint_gives_transformers_logits(name):
    """transformers' logits with the file's experts dequantized by compressed-tensors (it does
    not read per-expert tensors itself: the fixture script puts them back)."""
    expected = load_file(FIXTURES / name / "expected_logits.safetensors")
    model = from_pretrained(FIXTURES / name)
    with torch.no_grad():
        assert_logits_close(model(expected["input_ids"]), expected["logits"])
    assert bamba_greedy(model, expected["input_ids"], 6) == \
        expected["greedy_ids"][:, expected["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("name", LLMCOMPRESSOR)
def test_llmcompressor_granite_in_bf16_with_the_native_kernels(name, monkeypatch):
    """Prefill (each picked expert's products on the quantized kernels) and token-by-token
    decode in the one-call step (each pick's slice streamed quantized)."""
    calls = []
    real = decode_ops.decode_layers
    monkeypatch.setattr(decode_ops, "decode_layers",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(QuantizedExpertWeights, "expert", None)  # no dequantized experts
    expected = load_file(FIXTURES / name / "expected_logits.safetensors")
    model = accelerate(from_pretrained(FIXTURES / name, dtype=torch.bfloat16))
    logits = prefill_then_decode(model, expected["input_ids"], prefill=7)
    assert len(calls) == expected["input_ids"].shape[1] - 7
    diff = (logits - expected["logits"]).abs().max().item()
    assert diff <= BF16_ATOL, f"max abs logit difference {diff:.3g} > {BF16_ATOL}"


@pytest.mark.parametrize("name", LLMCOMPRESSOR)
def test_llmcompressor_granite_saved_by_bamba_is_the_same_file(name, tmp_path):
    save_pretrained(from_pretrained(FIXTURES / name, dtype=torch.bfloat16), tmp_path)
    stored, saved = file_tensors(FIXTURES / name), file_tensors(tmp_path)
    assert set(saved) == set(stored)
    for key, value in stored.items():  # A_log, D and dt_bias come back float32, same values
        assert same_bits(saved[key], value) or torch.equal(saved[key].float(), value.float()), key


# ---- `bamba quantize` of a Granite MoE -------------------------------------------------------
@pytest.fixture(scope="module")
def quantized_granite(tmp_path_factory) -> dict[str, Path]:
    """A transformers Granite MoE (bf16) and `bamba quantize` of it in each scheme."""
    from conftest import build_tokenizer, hf_model

    root = tmp_path_factory.mktemp("granite-experts")
    hf_model("granite-moe", **SHAPE).to(torch.bfloat16).save_pretrained(root / "source")
    build_tokenizer().save_pretrained(root / "source")
    out = {"source": root / "source"}
    for name, (flags, _) in OUR_SCHEMES.items():
        assert bamba_main(["quantize", str(root / "source"), str(root / name), "--no-progress",
                           *flags]) == 0
        out[name] = root / name
    return out


@pytest.mark.parametrize("name", OUR_SCHEMES)
def test_quantize_writes_each_expert_as_llmcompressor_does(quantized_granite, name):
    """Per-expert gate_proj / up_proj / down_proj tensors, each the source expert's rows
    quantized as a linear's would be; the routers kept in bf16 and ignored by name."""
    scheme = OUR_SCHEMES[name][1]
    source, stored = file_tensors(quantized_granite["source"]), file_tensors(quantized_granite[name])
    layers = sum(k.endswith("input_layernorm.weight") for k in source)
    for index in range(layers):
        moe = f"model.layers.{index}.block_sparse_moe"
        assert f"{moe}.input_linear.weight" not in stored
        assert stored[f"{moe}.router.layer.weight"].dtype == torch.bfloat16
        gate_up, down = source[f"{moe}.input_linear.weight"], source[f"{moe}.output_linear.weight"]
        width = gate_up.shape[1] // 2
        for e in range(gate_up.shape[0]):
            rows = {"gate_proj": gate_up[e, :width], "up_proj": gate_up[e, width:],
                    "down_proj": down[e]}
            for proj, weight in rows.items():
                for leaf, value in quantize(weight, scheme).items():
                    key = f"{moe}.experts.{e}.{proj}.{leaf}"
                    assert locate_piece(key) is not None and same_bits(stored[key], value), key
    config = json.loads((quantized_granite[name] / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert r"re:.*block_sparse_moe\.router$" in config["quantization_config"]["ignore"]


@pytest.mark.parametrize("name", OUR_SCHEMES)
def test_quantized_experts_give_the_logits_of_their_dequantized_weights(quantized_granite, name,
                                                                       tmp_path):
    """Exactly (float32): the torch path dequantizes each picked expert; saving writes the
    file back bit for bit."""
    model = from_pretrained(quantized_granite[name])
    assert all(isinstance(e.input_linear, QuantizedExpertWeights) and
               e.output_linear.scheme == OUR_SCHEMES[name][1] for e in experts_of(model))
    linears = model.model.layers[0].feed_forward.input_linear.scheme
    assert linears.name == OUR_SCHEMES[name][0][1]
    ids = random_ids(2, 13, seed=5)
    with torch.no_grad():
        quantized = model(ids)
        save_pretrained(model, tmp_path)
        dense = dequantize_model(model, torch.float32)
        assert type(experts_of(dense)[0].input_linear).__name__ == "ExpertWeights"
        assert torch.equal(dense(ids), quantized)
    stored, saved = file_tensors(quantized_granite[name]), file_tensors(tmp_path)
    assert set(saved) == set(stored)
    for key in (k for k in stored if locate_piece(k) is not None):
        assert same_bits(saved[key], stored[key]), key


@pytest.mark.parametrize("name", OUR_SCHEMES)
def test_quantized_experts_run_in_the_native_steps_as_the_torch_path(quantized_granite, name,
                                                                    monkeypatch):
    """bf16: prefill and the one-call decode step on the quantized kernels, within bf16
    rounding of the torch path (a wrong expert's slice is off by the logits' own size)."""
    calls = []
    real = decode_ops.decode_layers
    monkeypatch.setattr(decode_ops, "decode_layers",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = random_ids(2, 15, seed=11)
    previous = quant_ops.set_int8_activations(False)
    try:
        ref = prefill_then_decode(from_pretrained(quantized_granite[name], dtype=torch.bfloat16),
                                  ids, prefill=9)
        model = accelerate(from_pretrained(quantized_granite[name], dtype=torch.bfloat16))
        with monkeypatch.context() as patch:
            patch.setattr(QuantizedExpertWeights, "expert", None)
            fast = prefill_then_decode(model, ids, prefill=9)
    finally:
        quant_ops.set_int8_activations(previous)
    assert len(calls) == 6
    assert (fast - ref).abs().max() <= 0.05 * ref.abs().max()


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_experts_at_many_rows_take_the_integer_products_in_the_native_step(quantized_granite,
                                                                          name, monkeypatch):
    """24 rows over 4 experts: groups of more than the few-row kernels' 8 rows meet int8 and
    int4 experts in quant_gemm.h's products inside the one-call decode step, as the per-op
    path's do (float32, int8 activations on both sides: equal up to summation order but for
    an odd row where that order moved an input across an int8 rounding boundary)."""
    if not quant_ops.set_int8_activations(True):
        pytest.skip("no AVX-512 VNNI: the kernels keep bf16 activations")
    calls = []
    real = decode_ops.decode_layers
    monkeypatch.setattr(decode_ops, "decode_layers",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = random_ids(24, 8, seed=5)
    model = accelerate(from_pretrained(quantized_granite[name], dtype=torch.float32))
    fused = prefill_then_decode(model, ids, prefill=6)[:, 6:]
    assert len(calls) == 2
    monkeypatch.setattr(dispatch, "decode_step_fits", lambda *args: False)
    monkeypatch.setattr(dispatch, "layer_fits", lambda *args: False)
    per_op = prefill_then_decode(model, ids, prefill=6)[:, 6:]
    worst = (fused - per_op).abs().amax(dim=-1).flatten() / per_op.abs().max()
    assert (worst <= 1e-5).float().mean() >= 0.6, worst
    assert worst.max() <= 3e-2


def test_generate_and_the_engine_run_quantized_experts_as_plain_forward(quantized_granite):
    """float32 with the kernels on every side: generate and the engine's greedy tokens are
    those of full forwards without a cache. (A 7-row prefill, 1-row decode steps and a 15-row
    forward meet the same int8 activations, the few-row kernel's and the product's: the same
    numbers up to float32 summation order. When 3-8 rows met bf16 activations, ~1% apart, this
    random model's routing flipped, and the test ran on the torch path.)"""
    from bamba.engine import LLM, SamplingParams
    from bamba.generation import GenerationConfig, generate

    model = accelerate(from_pretrained(quantized_granite["int4"]))
    prompt = random_ids(1, 7, seed=4)[0].tolist()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    want = ids[len(prompt):]
    config = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    assert generate(model, [prompt], config)[0].token_ids == want
    llm = LLM(str(quantized_granite["int4"]), dtype="float32", memory_gb=0.02)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    assert list(llm.generate([prompt], params)[0].outputs[0].token_ids) == want


def test_pieces_split_across_shards_join(quantized_granite, tmp_path):
    """Sharded small enough that an expert stack's pieces land in several files."""
    model = from_pretrained(quantized_granite["int8"])
    save_pretrained(model, tmp_path, max_shard_size="60KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    stack = piece_modules("model.layers.0.block_sparse_moe.input_linear", 4)
    assert len({index[f"{m}.weight_packed"] for m in stack}) > 1
    ids = random_ids(1, 9, seed=8)
    with torch.no_grad():
        assert torch.equal(from_pretrained(tmp_path)(ids), model(ids))


def test_experts_in_a_scheme_of_their_own_are_a_config_group_of_their_own(quantized_granite):
    """--experts: a group targeting the per-expert linears by regex (beside "Linear"), so
    compressed-tensors (a regex over a class) and vLLM give them that scheme; fp8 beside packed
    int4 makes a mixed-precision config."""
    raw = json.loads((quantized_granite["fp8-experts-int4"] / "config.json").read_text())
    config = raw["quantization_config"]
    assert config["format"] == "mixed-precision"
    groups = list(config["config_groups"].values())
    assert [g["targets"] for g in groups] == [["Linear"], [EXPERT_LINEARS]]
    assert [(g["format"], g["weights"]["num_bits"]) for g in groups] == \
        [("float-quantized", 8), ("pack-quantized", 4)]


def test_experts_flag_on_a_model_without_experts_is_one_line(make_hf_checkpoint, tmp_path,
                                                             capsys):
    source = make_hf_checkpoint("granite")
    capsys.readouterr()  # transformers' saving
    assert bamba_main(["quantize", str(source), str(tmp_path / "out"), "--scheme", "int8",
                       "--experts", "int4", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no experts to quantize apart" in err, err
    assert not (tmp_path / "out").exists()


def test_zero_points_on_experts_are_one_line_and_a_symmetric_experts_scheme_works(
        quantized_granite, tmp_path, capsys):
    """`--asymmetric` quantizes the experts too unless `--experts` gives them a scheme of their
    own: zero points on experts are refused in one line, nothing written; with symmetric int4
    experts beside zero-point linears the checkpoint loads and runs."""
    source = quantized_granite["source"]
    assert bamba_main(["quantize", str(source), str(tmp_path / "bad"), "--scheme", "int4",
                       "--asymmetric", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "experts with zero points" in err, err
    assert not (tmp_path / "bad").exists()
    good = tmp_path / "good"
    assert bamba_main(["quantize", str(source), str(good), "--scheme", "int4", "--asymmetric",
                       "--experts", "int4", "--no-progress"]) == 0
    model = from_pretrained(good)
    assert all(stack.scheme.symmetric for e in experts_of(model)
               for stack in (e.input_linear, e.output_linear))
    assert not model.model.layers[0].mamba.in_proj.scheme.symmetric
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 17, 42, 7]]))).all()


def test_export_gguf_writes_the_experts_dequantized_a_weight_at_a_time(quantized_granite,
                                                                        tmp_path):
    """f32 holds each dequantized weight exactly: the file gives the quantized model's logits."""
    pytest.importorskip("gguf")
    out = tmp_path / "m.gguf"
    assert bamba_main(["export-gguf", str(quantized_granite["int4"]), str(out), "--dtype",
                       "f32"]) == 0
    ids = random_ids(1, 11, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(out)(ids),
                                   from_pretrained(quantized_granite["int4"])(ids),
                                   atol=1e-4, rtol=0)


def test_export_gguf_copies_int4_experts_into_q4_0_blocks_as_stored(quantized_granite,
                                                                    tmp_path):
    """int4 in groups of 32 to Q4_0: every expert's and linear's ints and scales go into the
    file as they are (each stacked gate-and-up split into ffn_gate_exps / ffn_up_exps, the
    shared MLP's fused linear into two, attention's q and k rows reordered) and read back bit
    for bit. (The bf16 token table and head are quantized to Q4_0 by the export itself.)"""
    pytest.importorskip("gguf")
    from bamba.quant.apply import stored_ints

    out = tmp_path / "m.gguf"
    assert bamba_main(["export-gguf", str(quantized_granite["int4"]), str(out), "--dtype",
                       "q4_0"]) == 0
    ours, back = from_pretrained(quantized_granite["int4"]), from_pretrained(out)
    names = [f"{n}.weight" for n, m in ours.named_modules()
             if hasattr(m, "weight_packed") and n != "lm_head" and n.startswith("model.layers")]
    for name in names:
        mine, theirs = stored_ints(ours, name), stored_ints(back, name)
        assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[1], theirs[1]), name
    experts = [n for n in names if ".experts." in n and n.endswith("_linear.weight")]
    assert len(experts) == 2 * len(experts_of(ours)) and len(names) > len(experts)


# ---- what does not fit -----------------------------------------------------------------------
def _rewrite(source: Path, target: Path, change) -> Path:
    """A copy of checkpoint ``source`` whose tensors pass through ``change(dict)``."""
    target.mkdir()
    for item in source.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    tensors = file_tensors(source)
    change(tensors)
    save_file(tensors, str(target / "model.safetensors"))
    return target


def _error(directory: Path, capsys) -> str:
    """from_pretrained's one-line ValueError, which `bamba generate` prints (exit 2)."""
    with pytest.raises(ValueError) as info:
        from_pretrained(directory)
    assert "\n" not in str(info.value)
    assert bamba_main(["generate", "--model", str(directory), "--prompt", "x", "--threads",
                       "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"bamba generate: error: {info.value}", err
    return err


def test_a_missing_expert_piece_is_named_in_one_line(quantized_granite, tmp_path, capsys):
    piece = "model.layers.1.block_sparse_moe.experts.2.up_proj.weight_packed"
    broken = _rewrite(quantized_granite["int4"], tmp_path / "missing",
                      lambda t: t.pop(piece))
    assert f"missing tensors {piece}" in _error(broken, capsys)


def test_a_piece_holding_the_wrong_shape_is_named_in_one_line(quantized_granite, tmp_path,
                                                               capsys):
    piece = "model.layers.0.block_sparse_moe.experts.1.down_proj.weight_shape"
    broken = _rewrite(quantized_granite["int8"], tmp_path / "shape",
                      lambda t: t.__setitem__(piece, torch.tensor([64, 256])))
    assert f"tensor {piece} holds [64, 256], expected [128, 128]" in _error(broken, capsys)


def test_an_expert_past_the_configs_count_is_an_unexpected_tensor(quantized_granite, tmp_path,
                                                                  capsys):
    extra = "model.layers.0.block_sparse_moe.experts.4.gate_proj.weight"
    broken = _rewrite(quantized_granite["fp8"], tmp_path / "extra", lambda t: t.__setitem__(
        extra, t["model.layers.0.block_sparse_moe.experts.0.gate_proj.weight"].clone()))
    assert f"unexpected tensor {extra} for this config" in _error(broken, capsys)


def test_experts_the_config_does_not_quantize_are_a_one_line_error(quantized_granite, tmp_path,
                                                                   capsys):
    directory = _rewrite(quantized_granite["int8"], tmp_path / "ignored", lambda t: None)
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"]["ignore"].append(r"re:.*block_sparse_moe\.experts\..*")
    (directory / "config.json").write_text(json.dumps(config))
    assert "block_sparse_moe.input_linear is stored quantized but quantization_config gives " \
        "it no scheme" in _error(directory, capsys)


def test_the_older_fp8_stack_layout_reads_as_the_per_expert_one(quantized_granite, tmp_path):
    """llm-compressor's first Granite 4 recipe stored fp8 experts whole: input_linear.weight
    [E, 2F, H] with weight_scale [E, 2F, 1]."""
    def stack(tensors: dict[str, torch.Tensor]) -> None:
        for key in [k for k in tensors if k.endswith("experts.0.gate_proj.weight")]:
            moe = key.removesuffix(".experts.0.gate_proj.weight")
            for kind in ("input_linear", "output_linear"):
                modules = piece_modules(f"{moe}.{kind}", 4)
                for leaf in ("weight", "weight_scale"):
                    parts = [tensors.pop(f"{m}.{leaf}") for m in modules]
                    tensors[f"{moe}.{kind}.{leaf}"] = torch.cat(parts).view(4, -1, parts[0].shape[1])

    directory = _rewrite(quantized_granite["fp8"], tmp_path / "stacked", stack)
    ids = random_ids(1, 9, seed=2)
    with torch.no_grad():
        assert torch.equal(from_pretrained(directory)(ids),
                           from_pretrained(quantized_granite["fp8"])(ids))
    with safe_open(directory / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.0.block_sparse_moe.input_linear.weight").get_shape() \
            == [4, 256, 128]
