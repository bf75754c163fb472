"""Quantized checkpoints: ``bamba quantize`` writes the compressed-tensors layout, and
``from_pretrained``, ``generate``, ``LLM``, the server and ``save_pretrained`` take it (ours or
shaped as llm-compressor writes it); a bad quantized checkpoint is one line naming the tensor."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bamba.budget import check_model_fits, weight_bytes
from bamba.checkpoint import from_pretrained, load_config
from bamba.cli import main
from bamba.engine import LLM, SamplingParams
from bamba.generation import GenerationConfig, generate
from bamba.quant.apply import quantize_model
from bamba.quant.config import parse_quantization_config, quantization_config_dict
from bamba.model import BambaLM
from bamba.quant.formats import FP8, QuantScheme, quantize
from bamba.quant.linear import QuantizedLinear
from serve_helpers import save_tiny_checkpoint

SCHEMES = {"fp8": QuantScheme("fp8"), "int8": QuantScheme("int8"),
           "int4": QuantScheme("int4", 16), "int4-asym": QuantScheme("int4", 16, symmetric=False)}
FLAGS = {"fp8": ["--scheme", "fp8"], "int8": ["--scheme", "int8"],
         "int4": ["--scheme", "int4", "--group-size", "16"],
         "int4-asym": ["--scheme", "int4", "--group-size", "16", "--asymmetric"]}
PROMPT = [5, 17, 42, 7, 99]


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("dense") / "ckpt")


@pytest.fixture(scope="module")
def quantized(dense: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantized")
    for name, flags in FLAGS.items():
        assert main(["quantize", str(dense), str(root / name), "--no-progress", *flags]) == 0
    return {name: root / name for name in FLAGS}


def _linear_names(directory: Path) -> list[str]:
    """Every linear layer of the checkpoint's model but lm_head."""
    with torch.device("meta"):
        model = BambaLM(load_config(directory))
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]


@pytest.mark.parametrize("name", list(SCHEMES))
def test_quantize_writes_the_compressed_tensors_layout(dense, quantized, name):
    scheme, out = SCHEMES[name], quantized[name]
    raw = json.loads((out / "config.json").read_text())
    assert raw["quantization_config"] == quantization_config_dict(scheme, ["lm_head"])
    assert raw["hidden_size"] == json.loads((dense / "config.json").read_text())["hidden_size"]
    assert (out / "tokenizer.json").read_bytes() == (dense / "tokenizer.json").read_bytes()
    source, written = load_file(dense / "model.safetensors"), load_file(out / "model.safetensors")
    linears = _linear_names(dense)
    assert {n.rsplit(".", 1)[1] for n in linears} == {
        "in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
        "down_proj"}
    for layer in linears:
        expected = quantize(source[f"{layer}.weight"], scheme)
        for tensor_name, tensor in expected.items():
            assert torch.equal(written[f"{layer}.{tensor_name}"].view(torch.uint8),
                               tensor.view(torch.uint8)), f"{layer}.{tensor_name}"
        assert f"{layer}.weight" not in written or not scheme.packed
    kept = {k: v for k, v in source.items() if k.rsplit(".", 1)[0] not in linears}
    assert "lm_head.weight" in kept and any(k.endswith("conv1d.weight") for k in kept)
    assert any(k.endswith("A_log") for k in kept) and any(k.endswith("dt_bias") for k in kept)
    for key, tensor in kept.items():  # conv, A_log, D, dt_bias, norms, embeddings, lm_head
        assert written[key].dtype == tensor.dtype and torch.equal(written[key], tensor), key
    extra = set(written) - set(kept) - {f"{lay}.{t}" for lay in linears for t in
                                        scheme.tensor_names()}
    assert not extra


@pytest.mark.parametrize("name", list(SCHEMES))
def test_compressed_tensors_reads_our_quantization_config(quantized, name):
    ct = pytest.importorskip("compressed_tensors.quantization")
    raw = json.loads((quantized[name] / "config.json").read_text())["quantization_config"]
    config = ct.QuantizationConfig.model_validate(raw)
    weights = config.config_groups["group_0"].weights
    assert config.format == raw["format"] and config.ignore == ["lm_head"]
    assert weights.num_bits == SCHEMES[name].bits
    assert weights.symmetric == SCHEMES[name].symmetric
    assert weights.group_size == SCHEMES[name].group_size
    assert config.config_groups["group_0"].input_activations is None


@pytest.mark.parametrize("name", list(SCHEMES))
def test_loaded_model_equals_quantizing_in_memory_and_its_weights_the_dense_ones(dense, quantized,
                                                                               name):
    loaded = from_pretrained(quantized[name])
    reference = quantize_model(from_pretrained(dense), SCHEMES[name])
    plain = from_pretrained(dense)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        got, want, dense_logits = loaded(ids), reference(ids), plain(ids)
    assert torch.equal(got, want)
    assert not torch.equal(got, dense_logits)
    for layer_name in _linear_names(dense):  # random tiny models amplify errors: check weights
        dense_weight = plain.get_submodule(layer_name).weight
        weight = loaded.get_submodule(layer_name).dequantized_weight(torch.float32)
        rel = ((weight - dense_weight).norm() / dense_weight.norm()).item()
        assert rel < {"fp8": 0.04, "int8": 0.01, "int4": 0.12, "int4-asym": 0.12}[name], \
            layer_name
    in_proj = loaded.model.layers[0].mamba.in_proj
    assert isinstance(in_proj, QuantizedLinear) and in_proj.scheme == SCHEMES[name]
    assert type(loaded.lm_head) is torch.nn.Linear
    assert loaded.model.layers[0].mamba.A_log.dtype == torch.float32


@pytest.mark.parametrize("name", list(SCHEMES))
def test_save_pretrained_round_trips_a_quantized_model(quantized, tmp_path, name):
    loaded = from_pretrained(quantized[name], dtype=torch.bfloat16)
    loaded.save_pretrained(tmp_path / "again")
    raw = json.loads((tmp_path / "again" / "config.json").read_text())
    assert raw["quantization_config"] == json.loads(
        (quantized[name] / "config.json").read_text())["quantization_config"]
    first, second = load_file(quantized[name] / "model.safetensors"), \
        load_file(tmp_path / "again" / "model.safetensors")
    assert set(first) == set(second)
    for key, tensor in first.items():  # quantized tensors bit for bit; the rest cast to bf16
        if tensor.dtype in (FP8, torch.int32, torch.int64) or key.endswith("weight_scale"):
            assert second[key].dtype == tensor.dtype
            assert torch.equal(second[key].view(torch.uint8), tensor.view(torch.uint8)), key
        else:
            assert torch.equal(second[key], tensor.to(second[key].dtype)), key
    again = from_pretrained(tmp_path / "again", dtype=torch.bfloat16)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert torch.equal(again(ids), loaded(ids))


def test_int4_model_holds_only_the_packed_weights_and_scales(quantized):
    model = from_pretrained(quantized["int4"], dtype=torch.bfloat16)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == len(_linear_names(quantized["int4"]))
    for layer in layers:
        n, k = layer.out_features, layer.in_features
        scale_bytes = n * (k // 16) * layer.weight_scale.element_size()
        held = sum(t.nbytes for t in layer.state_dict().values())
        assert held == n * k // 2 + scale_bytes + 16, layer  # + weight_shape's two int64
        assert not [p for p in layer.parameters() if p.dim() == 2]
    dense_bytes = sum(m.in_features * m.out_features * 4 for m in layers)  # stored float32
    quant_bytes = sum(t.nbytes for m in layers for t in m.state_dict().values())
    assert quant_bytes < dense_bytes * (4 + 32 / 16) / 32 * 1.05


def _greedy_by_forward(model, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("name", ["fp8", "int4", "int4-asym"])
def test_generate_engine_and_cli_run_a_quantized_checkpoint(quantized, name, capsys):
    directory = quantized[name]
    model = from_pretrained(directory)
    want = _greedy_by_forward(model, PROMPT, 8)
    config = GenerationConfig(max_new_tokens=8, eos_token_ids=[])
    assert generate(from_pretrained(directory), [PROMPT], config)[0].token_ids == want
    llm = LLM(str(directory), dtype="float32", memory_gb=0.01)
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert list(out[0].outputs[0].token_ids) == want
    assert main(["generate", "--model", str(directory), "--prompt", "State space",
                 "--max-new-tokens", "6", "--dtype", "float32", "--threads", "1"]) == 0
    assert capsys.readouterr().out.strip()


def test_the_server_runs_a_quantized_checkpoint(quantized):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from bamba.serve.app import build_app
    from bamba.serve.async_engine import AsyncEngine
    from serve_helpers import running

    directory = quantized["int4"]
    want = _greedy_by_forward(from_pretrained(directory), PROMPT, 6)
    llm = LLM(str(directory), dtype="float32", memory_gb=0.01)
    engine = AsyncEngine(llm).start()
    try:
        with running(build_app(engine, "q", None)) as base:
            reply = httpx.post(f"{base}/v1/completions", timeout=60, json={
                "model": "q", "prompt": PROMPT, "max_tokens": 6, "temperature": 0,
                "ignore_eos": True})
    finally:
        engine.shutdown()
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] == llm.tokenizer.decode(want)


# ---- errors ------------------------------------------------------------------------------------
def _one_line(capsys, verb: str, *fragments: str) -> None:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"bamba {verb}: error:"), err
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.parametrize("flags, fragments", [
    (["--scheme", "int4", "--group-size", "32"],
     ["group size 32 does not divide in_features 48 of model.layers.0.feed_forward.down_proj"]),
    (["--scheme", "fp8", "--group-size", "16"], ["--group-size applies to int8 and int4"]),
    (["--scheme", "int8", "--group-size", "0"], ["--group-size must be positive"]),
    (["--scheme", "int8", "--ignore", "lm_head,re:(x"], ["'re:(x' is not a regular expression"]),
])
def test_quantize_errors_are_one_line_and_write_nothing(dense, tmp_path, capsys, flags,
                                                        fragments):
    assert main(["quantize", str(dense), str(tmp_path / "out"), "--no-progress", *flags]) == 2
    _one_line(capsys, "quantize", *fragments)
    assert list(tmp_path.iterdir()) == []


def test_quantizing_a_quantized_checkpoint_or_a_bad_scheme_is_refused(quantized, tmp_path, capsys):
    assert main(["quantize", str(quantized["int8"]), str(tmp_path / "x"), "--scheme", "int4"]) == 2
    _one_line(capsys, "quantize", "is already quantized", "'pack-quantized'")
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", str(quantized["int8"]), str(tmp_path / "x"), "--scheme", "int3"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'int3'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _rewrite(src: Path, dst: Path, tensors=None, quantization=None) -> Path:
    """A copy of checkpoint ``src`` with its tensors / quantization_config changed."""
    dst.mkdir()
    for item in src.iterdir():
        (dst / item.name).write_bytes(item.read_bytes())
    if tensors is not None:
        state = load_file(src / "model.safetensors")
        tensors(state)
        save_file(state, dst / "model.safetensors")
    if quantization is not None:
        raw = json.loads((src / "config.json").read_text())
        quantization(raw["quantization_config"])
        (dst / "config.json").write_text(json.dumps(raw))
    return dst


IN_PROJ = "model.layers.0.mamba.in_proj"
DOWN = "model.layers.0.feed_forward.down_proj"


def _set(key: str, value) -> object:
    return lambda state: state.__setitem__(key, value(state[key]))


BAD = {
    "scale shape": (dict(tensors=_set(f"{IN_PROJ}.weight_scale", lambda t: t[:, :1].clone())),
                    f"tensor {IN_PROJ}.weight_scale has shape"),
    "packed size": (dict(tensors=_set(f"{IN_PROJ}.weight_packed", lambda t: t[:, 1:].clone())),
                    f"tensor {IN_PROJ}.weight_packed has shape"),
    "weight_shape": (dict(tensors=_set(f"{IN_PROJ}.weight_shape", lambda t: t + 8)),
                     f"tensor {IN_PROJ}.weight_shape holds"),
    "packed dtype": (dict(tensors=_set(f"{IN_PROJ}.weight_packed", lambda t: t.float())),
                     f"tensor {IN_PROJ}.weight_packed has dtype F32, expected I32"),
    "missing scale": (dict(tensors=lambda s: s.pop(f"{IN_PROJ}.weight_scale")),
                      f"missing tensors {IN_PROJ}.weight_scale"),
    "dense weight left": (dict(tensors=lambda s: s.__setitem__(f"{IN_PROJ}.weight",
                                                                torch.zeros(2, 2))),
                          f"unexpected tensor {IN_PROJ}.weight"),
    "unknown format": (dict(quantization=lambda q: q.__setitem__("format", "marlin-24")),
                       "format 'marlin-24' is not supported"),
    "asymmetric without zero points": (
        dict(quantization=lambda q: q["config_groups"]["group_0"]["weights"]
             .__setitem__("symmetric", False)),
        "missing tensors model.layers.0.feed_forward.down_proj.weight_zero_point"),
    "symmetric not a boolean": (dict(quantization=lambda q: q["config_groups"]["group_0"]
                                     ["weights"].__setitem__("symmetric", "yes")),
                                "symmetric 'yes' is not supported"),
    "format of another type": (dict(quantization=lambda q: q.__setitem__("format",
                                                                          "float-quantized")),
                               "int 4-bit weights do not fit format 'float-quantized'"),
    "unsupported bits": (dict(quantization=lambda q: q["config_groups"]["group_0"]["weights"]
                              .__setitem__("num_bits", 2)),
                         "type 'int' with num_bits 2 is not supported"),
    "bits not a number": (dict(quantization=lambda q: q["config_groups"]["group_0"]["weights"]
                               .__setitem__("num_bits", [4])),
                          "type 'int' with num_bits [4] is not supported"),
    "target not a regex": (dict(quantization=lambda q: q["config_groups"]["group_0"]
                                .__setitem__("targets", ["re:("])),
                           "config_groups.group_0.targets: 're:(' is not a regular expression"),
    "ignore not a regex": (dict(quantization=lambda q: q.__setitem__("ignore", ["re:a[b"])),
                           "ignore: 're:a[b' is not a regular expression"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_quantized_checkpoints_are_one_line_naming_the_tensor(quantized, tmp_path, capsys,
                                                                  monkeypatch, case):
    changes, fragment = BAD[case]
    bad = _rewrite(quantized["int4"], tmp_path / "bad", **changes)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("unpickled")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ValueError, match=None) as info:
        from_pretrained(bad)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert main(["generate", "--model", str(bad), "--prompt", "x", "--threads", "1"]) == 2
    _one_line(capsys, "generate", fragment)


@pytest.mark.parametrize("change, fragment", [
    (lambda t: t[1:].clone(), f"tensor {IN_PROJ}.weight_zero_point has shape"),
    (lambda t: t.float(), f"tensor {IN_PROJ}.weight_zero_point has dtype F32, expected I32")])
def test_bad_zero_points_are_one_line_naming_the_tensor(quantized, tmp_path, capsys, change,
                                                        fragment):
    bad = _rewrite(quantized["int4-asym"], tmp_path / "bad",
                   tensors=_set(f"{IN_PROJ}.weight_zero_point", change))
    with pytest.raises(ValueError) as info:
        from_pretrained(bad)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert main(["generate", "--model", str(bad), "--prompt", "x", "--threads", "1"]) == 2
    _one_line(capsys, "generate", fragment)


def test_truncated_quantized_file_is_one_line(quantized, tmp_path, capsys):
    bad = _rewrite(quantized["fp8"], tmp_path / "bad")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:len(data) // 2])
    assert main(["generate", "--model", str(bad), "--prompt", "x", "--threads", "1"]) == 2
    _one_line(capsys, "generate", "corrupt or truncated")


# ---- llm-compressor's shapes of the format ----------------------------------------------------
def test_fp8_dynamic_per_tensor_scales_static_input_scales_and_regex_ignore_load(
        dense, tmp_path, caplog):
    """FP8_DYNAMIC-style config (dynamic token activations), a scalar per-tensor scale, an
    ``input_scale`` a static scheme stores, and "re:" targets and ignores."""
    model = quantize_model(from_pretrained(dense), QuantScheme("fp8"))
    model.save_pretrained(tmp_path / "base")
    weight = model.model.layers[0].mamba.in_proj.weight.float() * \
        model.model.layers[0].mamba.in_proj.weight_scale.float()

    dense_down = load_file(dense / "model.safetensors")[f"{DOWN}.weight"]

    def tensors(state):
        state[f"{IN_PROJ}.weight_scale"] = (weight.abs().max() / 448).reshape(())
        state[f"{IN_PROJ}.weight"] = (weight / state[f"{IN_PROJ}.weight_scale"]).to(FP8)
        state[f"{IN_PROJ}.input_scale"] = torch.tensor([0.5])
        del state[f"{DOWN}.weight_scale"]
        state[f"{DOWN}.weight"] = dense_down

    def config(q):
        q["config_groups"] = {
            "group_0": {**q["config_groups"]["group_0"], "targets": [f"re:{IN_PROJ}$"],
                        "weights": {**q["config_groups"]["group_0"]["weights"],
                                    "strategy": "tensor"},
                        "input_activations": {"num_bits": 8, "type": "float", "symmetric": True,
                                              "strategy": "token", "dynamic": True}},
            "group_1": {**q["config_groups"]["group_0"], "targets": ["Linear"]}}
        q["ignore"] = ["re:.*lm_head", "re:.*layers\\.0\\.feed_forward\\.down_proj"]

    ckpt = _rewrite(tmp_path / "base", tmp_path / "llmc", tensors, config)
    with caplog.at_level(logging.INFO, logger="bamba"):
        loaded = from_pretrained(ckpt)
    assert "activations quantized by the scheme run in the model's dtype" in caplog.text
    in_proj = loaded.model.layers[0].mamba.in_proj
    assert isinstance(in_proj, QuantizedLinear) and in_proj.weight_scale.shape == (1,)
    assert type(loaded.model.layers[0].feed_forward.down_proj) is torch.nn.Linear
    assert type(loaded.lm_head) is torch.nn.Linear
    assert isinstance(loaded.model.layers[0].feed_forward.up_proj, QuantizedLinear)
    x = torch.randn(2, in_proj.in_features)
    ref = torch.nn.functional.linear(x, (in_proj.weight.float() * in_proj.weight_scale.float()))
    assert torch.allclose(in_proj(x), ref)


# ---- memory budget and configs -----------------------------------------------------------------
def test_the_budget_counts_quantized_bytes(dense):
    config = load_config(dense)
    bf16 = weight_bytes(config, 2)
    int4 = weight_bytes(config, 2, quantized_bits=4)
    assert int4 < bf16 * 0.6
    check_model_fits(config, 2, available=int4 + 1, quantized_bits=4)
    with pytest.raises(ValueError, match="of weights, but"):
        check_model_fits(config, 2, available=int4 + 1)


@pytest.mark.parametrize("actorder", ["static", "weight"])
def test_gptq_weight_activation_ordering_loads_as_the_plain_format(quantized, tmp_path,
                                                                    actorder):
    """llm-compressor's GPTQ writes actorder "static" (alias "weight") by default: only its
    calibration order changed, the stored format is the plain group one (no g_idx)."""
    changed = _rewrite(quantized["int4"], tmp_path / actorder, quantization=lambda q: q[
        "config_groups"]["group_0"]["weights"].__setitem__("actorder", actorder))
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert torch.equal(from_pretrained(changed)(ids), from_pretrained(quantized["int4"])(ids))


@pytest.mark.parametrize("change, fragment", [
    (lambda q: q.__setitem__("quant_method", "gptq"), "quant_method 'gptq' is not supported"),
    (lambda q: q.__setitem__("quantization_status", "frozen"), "quantization_status 'frozen'"),
    (lambda q: q.__setitem__("kv_cache_scheme", {"num_bits": 8}), "kv_cache_scheme"),
    (lambda q: q["config_groups"]["group_0"]["weights"].__setitem__("actorder", "group"),
     "activation ordering 'group' (g_idx) is not supported"),
    (lambda q: q["config_groups"]["group_0"]["weights"].__setitem__("strategy", "block"),
     "strategy 'block' is not supported"),
    (lambda q: q["config_groups"]["group_0"].__setitem__("weights", None), "activation-only"),
    (lambda q: q.__setitem__("format", "mixed-precision"),
     "config_groups.group_0.format 'mixed-precision' is not supported"),
])
def test_unsupported_quantization_configs_are_named(change, fragment):
    """(A "mixed-precision" config needs each group's format.)"""
    raw = quantization_config_dict(QuantScheme("int4", 128), ["lm_head"])
    parse_quantization_config(raw)
    change(raw)
    with pytest.raises(ValueError, match=None) as info:
        parse_quantization_config(raw)
    assert fragment in str(info.value)


def test_ignore_list_chooses_the_dense_layers(dense, tmp_path):
    assert main(["quantize", str(dense), str(tmp_path / "all"), "--scheme", "int8", "--ignore", "",
                 "--no-progress"]) == 0
    assert isinstance(from_pretrained(tmp_path / "all").lm_head, QuantizedLinear)
    assert main(["quantize", str(dense), str(tmp_path / "attn"), "--scheme", "int8",
                 "--ignore", r"lm_head,re:.*\.mamba\.", "--no-progress"]) == 0
    model = from_pretrained(tmp_path / "attn")
    kinds = {name.rsplit(".", 1)[-1]: type(m) for name, m in model.named_modules()
             if isinstance(m, (torch.nn.Linear, QuantizedLinear))}
    assert kinds["in_proj"] is torch.nn.Linear and kinds["out_proj"] is torch.nn.Linear
    assert kinds["q_proj"] is QuantizedLinear and kinds["lm_head"] is torch.nn.Linear
    raw = json.loads((tmp_path / "attn" / "config.json").read_text())["quantization_config"]
    assert raw["ignore"] == ["lm_head", r"re:.*\.mamba\."]


def test_mixed_precision_configs_take_each_groups_format():
    raw = quantization_config_dict(QuantScheme("int4", 128), ["lm_head"])
    fp8 = quantization_config_dict(QuantScheme("fp8"), [])["config_groups"]["group_0"]
    raw["config_groups"]["group_0"] |= {"targets": ["re:.*mlp.*"], "format": "pack-quantized"}
    raw["config_groups"]["group_1"] = fp8 | {"format": "float-quantized"}
    raw["format"] = "mixed-precision"
    parsed = parse_quantization_config(raw)
    assert parsed.group_for("model.layers.0.mlp.up_proj", ("Linear",)).scheme.name == "int4"
    assert parsed.group_for("model.layers.0.self_attn.q_proj", ("Linear",)).scheme.name == "fp8"
    assert parsed.group_for("lm_head", ("Linear",)) is None


def test_quantize_writes_each_shard_once_full_not_after_reading_everything(dense, tmp_path,
                                                                          monkeypatch):
    """The converted tensors stream into the writer: a shard reaches the disk while most of
    the source is still unread, so about one shard is held (not the whole output)."""
    from bamba import checkpoint_writer
    from bamba.quant import convert

    read, written = [], []
    real_open, real_save = convert.open_safetensors, checkpoint_writer.save_file

    def counting_open(path):
        read.append(path)
        return real_open(path)

    def noting_save(tensors, filename, metadata=None):
        written.append((len(read), sum(t.nbytes for t in tensors.values()), len(tensors)))
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(convert, "open_safetensors", counting_open)
    monkeypatch.setattr(checkpoint_writer, "save_file", noting_save)
    limit = 20_000
    assert main(["quantize", str(dense), str(tmp_path / "q"), "--scheme", "int8",
                 "--max-shard-size", str(limit), "--no-progress"]) == 0
    assert len(written) > 3 and written[0][0] < len(read) // 2
    assert all(size <= limit or count == 1 for _, size, count in written)
    model = from_pretrained(tmp_path / "q")
    single = from_pretrained(dense)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert (model(ids) - single(ids)).abs().max() < 0.5  # int8 of the same weights
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(written)
