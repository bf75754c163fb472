"""Property-based corruption of what bamba reads from disk: a dense or quantized (compressed-
tensors) checkpoint directory whose tensors, config.json or generation_config.json fields are
changed at random (its generation defaults then usable ones or refused), a GGUF
file with bytes flipped or cut, and a tokenized dataset's shard rewritten or damaged either
load (and a model runs a forward pass, a dataset's ids fit the model) or fail with one
ValueError of one line (what the CLI prints as its one-line error, exit 2): never another
exception, never a traceback. Nothing is unpickled on the way. The default run is bounded for
CI; the ``slow`` one tries many more cases. (Sweeps like these found a regex target that was no
regex, a zero head count, a list for num_bits, a GGUF head length of 0, a shard of strings and
negative ids escaping as re.error, ZeroDivisionError, TypeError, AttributeError and an
embedding's IndexError.)"""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from bamba.checkpoint import from_pretrained
from bamba.cli import main
from bamba.data.shards import MANIFEST, write_shard
from bamba.eval.documents import read_shard_documents
from bamba.generation import GenerationConfig
from bamba.generation_defaults import GENERATION_CONFIG_NAME
from serve_helpers import save_tiny_checkpoint

QUICK, LONG = 400, 5000  # examples per test
QUANTIZE = {"fp8": ["--scheme", "fp8"], "int8": ["--scheme", "int8"],
            "int4": ["--scheme", "int4", "--group-size", "16"],
            "int4-asym": ["--scheme", "int4", "--group-size", "16", "--asymmetric"],
            "int8-head-table": ["--scheme", "int8", "--group-size", "16", "--lm-head", "int4",
                                "--embedding", "int8"]}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8, torch.uint8,
          torch.int32, torch.int64, torch.bool, torch.float8_e4m3fn]
ODD = [None, 0, -1, 1, 2, 3, 4, 8, 16, 1000, -16, 1.5, "4", "x", True, False, [], {}, [0], [99]]
WEIGHT_FIELDS = ["num_bits", "type", "strategy", "group_size", "symmetric", "dynamic",
                 "actorder", "observer"]
STRATEGY_WORDS = ["int", "float", "channel", "group", "tensor", "block", "token"]
FORMATS = ["pack-quantized", "float-quantized", "int-quantized", "naive-quantized",
           "mixed-precision", "marlin-24", "dense"]
NAME_LISTS = [None, [], "lm_head", [None], [1], ["re:("], ["re:.*"], ["Linear"], ["lm_head"],
              ["Embedding"], {}]
MODEL_FIELDS = ["hidden_size", "num_hidden_layers", "vocab_size", "attn_layer_indices",
                "mamba_n_heads", "mamba_d_head", "mamba_d_state", "mamba_n_groups",
                "mamba_d_conv", "mamba_expand", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "tie_word_embeddings", "rms_norm_eps",
                "rope_theta", "max_position_embeddings", "time_step_limit"]

GENERATION_FIELDS = ["eos_token_id", "temperature", "top_k", "top_p", "min_p",
                     "repetition_penalty", "max_new_tokens", "do_sample"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz-sources")
    dense = save_tiny_checkpoint(root / "dense")
    out = {"dense": dense}
    for name, flags in QUANTIZE.items():
        assert main(["quantize", str(dense), str(root / name), "--no-progress", *flags]) == 0
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def gguf_files(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
               ) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz-gguf")
    out = {}
    for dtype in ("bf16", "q8_0", "q4_0"):
        out[dtype] = root / f"tiny-{dtype}.gguf"
        assert main(["export-gguf", str(sources["dense"]), str(out[dtype]), "--dtype",
                     dtype]) == 0
    return out


HEADROOM = 8 << 30  # bytes of address space a case may add to the process's


@pytest.fixture(autouse=True)
def bounded_memory():
    """A case that would allocate without bound fails as an exception (and hypothesis prints
    it) instead of the machine's OOM killer ending the whole run: the address space is capped
    at what the process holds plus ``HEADROOM`` while the test runs. (One slow run was
    killed so at 24 GB during the GGUF cases; the case was lost.)"""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as statm:
        held = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    cap = held + HEADROOM if hard == resource.RLIM_INFINITY else min(held + HEADROOM, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture(autouse=True)
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("unpickled")

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)


def _corrupt_tensor(data: st.DataObject, state: dict[str, torch.Tensor]) -> str:
    key = data.draw(st.sampled_from(sorted(state)), label="tensor")
    t = state[key]
    kind = data.draw(st.sampled_from(["shape", "dtype", "values", "drop", "flatten", "empty",
                                      "rename"]), label="change")
    if kind == "drop":
        state.pop(key)
    elif kind == "rename":
        state[key.replace("weight", "wait") if "weight" in key else key + "_x"] = state.pop(key)
    elif kind == "dtype":
        dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
        state[key] = torch.zeros(t.shape, dtype=dtype)
    elif kind == "shape" and t.dim() > 0:
        dim = data.draw(st.integers(0, t.dim() - 1), label="dim")
        shape = list(t.shape)
        shape[dim] = data.draw(st.sampled_from([0, 1, max(shape[dim] - 1, 0), shape[dim] + 1,
                                                2 * shape[dim]]), label="size")
        state[key] = torch.zeros(shape, dtype=t.dtype)
    elif kind == "flatten":
        state[key] = t.reshape(-1) if t.dim() != 1 else t.reshape(1, -1)
    elif kind == "empty":
        state[key] = torch.zeros(0, dtype=t.dtype)
    elif kind == "values" and t.is_floating_point():
        value = data.draw(st.sampled_from([float("nan"), float("inf"), 0.0, -1.0, 1e30]),
                          label="value")
        state[key] = torch.full(t.shape, value).to(t.dtype)
    elif kind == "values" and t.dtype != torch.bool:
        info = torch.iinfo(t.dtype)
        state[key] = torch.randint(info.min, info.max, t.shape, dtype=torch.int64,
                                   generator=torch.Generator().manual_seed(
                                       data.draw(st.integers(0, 99), label="seed"))).to(t.dtype)
    return f"{key}: {kind}"


def _corrupt_config(data: st.DataObject, raw: dict[str, Any]) -> str:
    quant = raw.get("quantization_config")
    part = data.draw(st.sampled_from(["model", "quantization"] if isinstance(quant, dict)
                                     else ["model"]), label="part")
    if part == "model":
        field = data.draw(st.sampled_from(MODEL_FIELDS), label="field")
        raw[field] = data.draw(st.sampled_from(ODD + [0.0, 1e-300, [0, 1], [-1]]), label="value")
        return f"config {field}={raw[field]!r}"
    groups = sorted(quant.get("config_groups") or {})
    kind = data.draw(st.sampled_from(["weights", "format", "targets", "ignore", "drop", "whole"]
                                     if groups else ["format", "ignore", "drop", "whole"]),
                     label="change")
    if kind == "weights" or kind == "targets":
        group = quant["config_groups"][data.draw(st.sampled_from(groups), label="group")]
        if kind == "targets":
            group["targets"] = data.draw(st.sampled_from(NAME_LISTS), label="targets")
            return f"targets={group['targets']!r}"
        field = data.draw(st.sampled_from(WEIGHT_FIELDS), label="field")
        if not isinstance(group.get("weights"), dict):
            group["weights"] = {}
        group["weights"][field] = data.draw(st.sampled_from(ODD + STRATEGY_WORDS), label="value")
        return f"weights.{field}={group['weights'][field]!r}"
    if kind == "format":
        quant["format"] = data.draw(st.sampled_from(ODD + FORMATS), label="format")
        return f"format={quant['format']!r}"
    if kind == "ignore":
        quant["ignore"] = data.draw(st.sampled_from(NAME_LISTS), label="ignore")
        return f"ignore={quant['ignore']!r}"
    if kind == "drop" and quant:
        key = data.draw(st.sampled_from(sorted(quant)), label="key")
        quant.pop(key)
        return f"without {key}"
    raw["quantization_config"] = data.draw(st.sampled_from(
        [None, [], "x", 1, {}, {"quant_method": "gptq"}, {"quant_method": "compressed-tensors"}]),
        label="whole")
    return f"quantization_config={raw['quantization_config']!r}"


def _corrupt_generation_config(data: st.DataObject, raw: dict[str, Any]) -> str:
    field = data.draw(st.sampled_from(GENERATION_FIELDS), label="generation field")
    raw[field] = data.draw(st.sampled_from(ODD + [0.0, 1e-300, 1e39, float("nan"),
                                                   float("inf"), [2, -1], [2, "x"]]),
                           label="value")
    return f"generation_config.json {field}={raw[field]!r}"


def _loads_or_says_why_in_one_line(path: Path, what: list[str]) -> None:
    try:
        model = from_pretrained(path)
        GenerationConfig.for_model(model)  # its generation defaults are usable ones
        with torch.no_grad():
            model(torch.tensor([[5, 17, 42, 7]]))
    except ValueError as err:
        message = str(err)
        assert message and "\n" not in message, (what, message)


def _directory_case(sources: dict[str, Path], tmp_path: Path, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(sources)), label="checkpoint")
    target = tmp_path / "case"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(sources[name], target)
    state = load_file(target / "model.safetensors")
    raw = json.loads((target / "config.json").read_text())
    generation = json.loads((target / GENERATION_CONFIG_NAME).read_text())
    what = [name]
    for _ in range(data.draw(st.integers(1, 3), label="changes")):
        part = data.draw(st.sampled_from(["tensor", "config", "generation"]), label="part")
        if part == "tensor":
            what.append(_corrupt_tensor(data, state))
        elif part == "config":
            what.append(_corrupt_config(data, raw))
        else:
            what.append(_corrupt_generation_config(data, generation))
    save_file(state, target / "model.safetensors")
    (target / "config.json").write_text(json.dumps(raw))
    (target / GENERATION_CONFIG_NAME).write_text(json.dumps(generation))
    _loads_or_says_why_in_one_line(target, what)


def _gguf_case(files: dict[str, Path], tmp_path: Path, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(files)), label="file")
    raw = bytearray(files[name].read_bytes())
    kind = data.draw(st.sampled_from(["flip", "integer", "cut", "zero"]), label="change")
    # most of the header, the metadata and the tensor infos lie in the first few KB
    span = data.draw(st.sampled_from([64, 4096, len(raw)]), label="span")
    at = data.draw(st.integers(0, min(span, len(raw)) - 17), label="at")
    if kind == "flip":
        raw[at] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    elif kind == "integer":
        raw[at:at + 8] = struct.pack("<q", data.draw(st.sampled_from(
            [-1, 0, 1, 7, 255, 2**31, 2**62]), label="value"))
    elif kind == "cut":
        raw = raw[:at]
    else:
        raw[at:at + 16] = bytes(16)
    path = tmp_path / "case.gguf"
    path.write_bytes(bytes(raw))
    _loads_or_says_why_in_one_line(path, [name, kind, f"at {at}"])


VOCAB = 320


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenized dataset of two shards, as ``bamba tokenize`` writes it."""
    root = tmp_path_factory.mktemp("fuzz-shards")
    docs = [[(7 * i + j) % VOCAB for j in range(3 + i % 5)] for i in range(12)]
    entries = []
    for n, part in enumerate((docs[:6], docs[6:])):
        name = f"shard-{n:05d}.arrow"
        entries.append({"file": name, "documents": len(part),
                        "tokens": write_shard(root / name, part)})
    (root / MANIFEST).write_text(json.dumps({
        "format": "bamba-shards-v1", "complete": True, "documents": len(docs),
        "tokens": sum(e["tokens"] for e in entries), "tokenizer": {"vocab_size": VOCAB},
        "shards": entries}))
    return root


def _shard_case(dataset: Path, tmp_path: Path, data: st.DataObject) -> None:
    import pyarrow as pa

    target = tmp_path / "case"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(dataset, target)
    shard = target / data.draw(st.sampled_from(["shard-00000.arrow", "shard-00001.arrow"]),
                               label="shard")
    kind = data.draw(st.sampled_from(["column", "flip", "cut", "zero"]), label="change")
    if kind == "column":
        value_type = data.draw(st.sampled_from([pa.uint32(), pa.int32(), pa.int64(), pa.uint8(),
                                                pa.float32(), pa.string(), None]), label="type")
        ids = data.draw(st.lists(st.lists(st.integers(-3, VOCAB + 3), max_size=4), min_size=6,
                                 max_size=6), label="documents")
        if value_type is None:
            column = pa.array([len(d) for d in ids])
        elif value_type == pa.string():
            column = pa.array([str(d) for d in ids])
        else:
            column = pa.array(ids, pa.list_(pa.int64())).cast(pa.list_(value_type), safe=False)
        table = pa.table({"tokens": column})
        with pa.OSFile(str(shard), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    else:
        raw = bytearray(shard.read_bytes())
        at = data.draw(st.integers(0, len(raw) - 17), label="at")
        if kind == "flip":
            raw[at] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        elif kind == "cut":
            raw = raw[:at]
        else:
            raw[at:at + 16] = bytes(16)
        shard.write_bytes(bytes(raw))
    try:
        documents = read_shard_documents(str(target), VOCAB)
    except ValueError as err:
        assert str(err) and "\n" not in str(err), (kind, str(err))
        return
    assert all(0 <= int(t) < VOCAB for doc in documents for t in doc), kind


CASES = {"checkpoint directory": ("sources", _directory_case),
         "gguf file": ("gguf_files", _gguf_case),
         "dataset shard": ("dataset", _shard_case)}


def _fuzz(kind: str, request: pytest.FixtureRequest, tmp_path: Path, examples: int,
          derandomize: bool) -> None:
    fixture, case = CASES[kind]
    source = request.getfixturevalue(fixture)

    @settings(max_examples=examples, derandomize=derandomize, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data())
    def corrupted(data: st.DataObject) -> None:
        case(source, tmp_path, data)

    corrupted()


@pytest.mark.parametrize("kind", list(CASES))
def test_a_corrupted_input_loads_or_is_one_line(kind, request, tmp_path):
    _fuzz(kind, request, tmp_path, QUICK, derandomize=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(CASES))
def test_many_corrupted_inputs(kind, request, tmp_path):
    _fuzz(kind, request, tmp_path, LONG, derandomize=False)
