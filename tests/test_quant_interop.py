"""Quantized checkpoints against the real peers (no mocks).

- llm-compressor's files (tests/fixtures/llmcompressor/, made by
  scripts/make_llmcompressor_fixture.sh: a tiny random Bamba quantized by llm-compressor's
  ``oneshot`` with FP8_DYNAMIC, W4A16, W8A16 and W4A16_ASYM, zero points and all, and GPTQ's
  W4A16 with its default actorder "static") load in bamba with their weights still
  quantized, and give the float32 logits and greedy tokens transformers recorded for them;
  saved back by bamba, they still give transformers those logits.
- transformers (with the ``compressed-tensors`` package) reads what ``bamba quantize`` writes
  (fp8, int8, int4): each weight as it decompresses it is the source weight within the format's
  rounding, and its logits and greedy tokens are ours.

Tolerance: ATOL = 1e-4 on float32 logits, the bound of tests/test_parity.py for the same two
implementations on dense weights. Quantization adds nothing to it: both sides dequantize with
one float32 multiply q * scale (exact for llm-compressor's bf16 scales), so the dense weights
are bit-equal and what is left is the two models' float32 arithmetic.
FP8_DYNAMIC's fp8 rounding of activations is off on transformers' side when recording: bamba
runs activations unquantized (the fixtures' README gives how far that rounding moves them).
"""

from __future__ import annotations

from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path

import pytest
import torch
from conftest import hf_logits, hf_model, load_hf, random_ids
from safetensors import safe_open
from safetensors.torch import load_file
from test_parity import assert_logits_close
from torch import nn

from bamba.cache import ContiguousCache
from bamba.checkpoint import from_pretrained, save_pretrained
from bamba.cli import main as bamba_main
from bamba.generation import GenerationConfig, generate
from bamba.native import accelerate, quant_ops
from bamba.quant.linear import QuantizedLinear

FIXTURES = Path(__file__).parent / "fixtures" / "llmcompressor"
_SPEC = spec_from_file_location(
    "llmcompressor_fixture", Path(__file__).parents[1] / "scripts" / "llmcompressor_fixture.py")
FIXTURE_SCRIPT = module_from_spec(_SPEC)
_SPEC.loader.exec_module(FIXTURE_SCRIPT)
LLMCOMPRESSOR = {"fp8_dynamic": "fp8", "w4a16": "int4", "w8a16": "int8", "w4a16_asym": "int4",
                 "w4a16_gptq": "int4"}
# bf16 activations against transformers' float32: 0.07-0.09 measured on the fixtures, torch
# reference or native kernels, prefill or decode (this random model is sensitive: rounding its
# weights to bf16 alone moves logits by 0.04); a wrong scale, group or packing order moves them
# by O(1) (logit std 1.15).
BF16_ATOL = 0.25
# With int8 activations (bamba's default for int8 and int4 weights at every row count) their
# rounding adds its own: 0.17-0.19 measured on the round-to-nearest fixtures, 0.32 on GPTQ's.
INT8_ACTIVATIONS_ATOL = 0.5
# Shapes of our own checkpoints: every linear's in_features divisible by GROUP.
GROUP = 32
OURS = dict(hidden_size=64, intermediate_size=128, mamba_d_head=32)
OUR_SCHEMES = {"fp8": ["--scheme", "fp8"], "int8": ["--scheme", "int8"],
               "int4": ["--scheme", "int4", "--group-size", str(GROUP)],
               "int4-asym": ["--scheme", "int4", "--group-size", str(GROUP), "--asymmetric"]}
NEW_TOKENS = 5
MIN_MARGIN = 1e-3  # top-2 logit gap a greedy step needs to be compared (10 x ATOL)


def file_tensors(directory: Path) -> dict[str, torch.Tensor]:
    with safe_open(directory / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def quantized_prefixes(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The layers a compressed-tensors file quantizes: those with a weight_scale."""
    return sorted(k.removesuffix(".weight_scale") for k in tensors if k.endswith(".weight_scale"))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality, fp8 included (torch.equal has no fp8 kernel on the CPU)."""
    as_bytes = (lambda t: t.view(torch.uint8)) if a.dtype == torch.float8_e4m3fn else (lambda t: t)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))


def bamba_greedy(model: nn.Module, prompts: torch.Tensor, steps: int) -> list[list[int]]:
    config = GenerationConfig(max_new_tokens=steps, ignore_eos=True)
    return [r.token_ids for r in generate(model, prompts.tolist(), config)]


# ---- llm-compressor's checkpoints in bamba --------------------------------------------------
@pytest.mark.parametrize("name", LLMCOMPRESSOR)
def test_llmcompressor_checkpoint_loads_with_weights_still_quantized(name):
    directory = FIXTURES / name
    tensors = file_tensors(directory)
    prefixes = quantized_prefixes(tensors)
    assert any(p.endswith("mamba.in_proj") for p in prefixes)  # the fixture covers Mamba layers
    model = from_pretrained(directory)
    for prefix in prefixes:
        layer = model.get_submodule(prefix)
        assert isinstance(layer, QuantizedLinear), prefix
        assert layer.scheme.name == LLMCOMPRESSOR[name], prefix
        for tensor_name, stored in layer.quantized_tensors().items():
            assert same_bits(stored, tensors[f"{prefix}.{tensor_name}"]), f"{prefix}.{tensor_name}"
    assert type(model.lm_head) is nn.Linear  # llm-compressor's ignore list kept it dense


@pytest.mark.parametrize("name", LLMCOMPRESSOR)
def test_llmcompressor_checkpoint_gives_transformers_logits(name):
    expected = load_file(FIXTURES / name / "expected_logits.safetensors")
    model = from_pretrained(FIXTURES / name)
    with torch.no_grad():
        assert_logits_close(model(expected["input_ids"]), expected["logits"])


@torch.no_grad()
def prefill_then_decode(model: nn.Module, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of ``ids``: the first ``prefill`` tokens in one call, then one token a call, all
    through a cache in the model's dtype."""
    b, total = ids.shape
    dtype = model.dtype
    cache = ContiguousCache(model.config, rows=b, max_len=total, dtype=dtype)
    out = []
    for start, end in [(0, prefill), *((t, t + 1) for t in range(prefill, total))]:
        positions = torch.arange(start, end).expand(b, end - start)
        out.append(model(ids[:, start:end], positions=positions, cache=cache).float())
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("name", LLMCOMPRESSOR)
@pytest.mark.parametrize("int8_activations", [False, True])
def test_llmcompressor_checkpoint_in_bf16_stays_near_transformers_logits(name, int8_activations):
    """bf16, the dtype these files are made for, with the native kernels installed: prefill
    and token-by-token decode, with bf16 activations and with int8 ones."""
    expected = load_file(FIXTURES / name / "expected_logits.safetensors")
    model = accelerate(from_pretrained(FIXTURES / name, dtype=torch.bfloat16))
    quant_ops.set_int8_activations(int8_activations)
    try:
        logits = prefill_then_decode(model, expected["input_ids"], prefill=7)
    finally:
        quant_ops.set_int8_activations(True)
    diff = (logits - expected["logits"]).abs().max().item()
    bound = INT8_ACTIVATIONS_ATOL if int8_activations else BF16_ATOL
    assert diff <= bound, f"max abs logit difference {diff:.3g} > {bound}"


@pytest.mark.parametrize("name", LLMCOMPRESSOR)
def test_llmcompressor_checkpoint_gives_transformers_greedy_tokens(name):
    """The recorded prompt keeps every greedy step's top-2 margin >= 0.05 (500 x ATOL), with
    the activations as they are: int8 activations (bamba's default for int weights) move
    these float32 logits by up to ~0.18, more than that margin."""
    expected = load_file(FIXTURES / name / "expected_logits.safetensors")
    prompts = expected["input_ids"]
    continuation = expected["greedy_ids"][:, prompts.shape[1]:]
    model = from_pretrained(FIXTURES / name)
    quant_ops.set_int8_activations(False)
    try:
        assert bamba_greedy(model, prompts, continuation.shape[1]) == continuation.tolist()
    finally:
        quant_ops.set_int8_activations(True)


def load_hf_weight_only(directory: Path) -> nn.Module:
    """transformers' float32 model of a compressed-tensors checkpoint, activations unquantized,
    loaded as the fixtures' expected logits were recorded (scripts/llmcompressor_fixture.py:
    asymmetric weights put in by hand, decompressed by compressed-tensors' own code)."""
    return FIXTURE_SCRIPT.load(directory, quantize_activations=False)


@pytest.mark.parametrize("name", LLMCOMPRESSOR)
def test_llmcompressor_checkpoint_saved_by_bamba_reads_back_in_transformers(name, tmp_path):
    expected = load_file(FIXTURES / name / "expected_logits.safetensors")
    save_pretrained(from_pretrained(FIXTURES / name, dtype=torch.bfloat16), tmp_path)
    stored, saved = file_tensors(FIXTURES / name), file_tensors(tmp_path)
    for prefix in quantized_prefixes(stored):
        for key in (k for k in stored if k.startswith(f"{prefix}.")):
            assert same_bits(saved[key], stored[key]), key
    hf = load_hf_weight_only(tmp_path)
    assert_logits_close(hf_logits(hf, expected["input_ids"]), expected["logits"])


# ---- our checkpoints in transformers ---------------------------------------------------------
def rounding_bound(source: torch.Tensor, scale: torch.Tensor, scheme: str) -> torch.Tensor:
    """How far w and (q - zp) * scale may be apart, elementwise, with the scale maybe rounded
    (the slack, 2^-7 of w, covers bf16's 2^-9): symmetric ints half a step (the absmax element
    clamps to 2^(b-1) - 1 from 2^(b-1) - 1/2), asymmetric ones a step (the rounded zero point
    may clamp an end of the range by half a step more), fp8 half an ulp of its 3-bit mantissa
    (2^-4 relative) or half its subnormal step (2^-10 x scale)."""
    n, k = source.shape
    step = scale.float().repeat_interleave(k // scale.shape[1], dim=1)
    slack = 2 ** -7
    if scheme == "fp8":
        return source.abs() * (2 ** -4 + slack) + step * 2 ** -10 * (1 + slack)
    return step * ((1.0 if scheme.endswith("asym") else 0.5) + slack) + source.abs() * slack


def quantize_ours(source: Path, target: Path, scheme: str) -> None:
    assert bamba_main(["quantize", str(source), str(target), *OUR_SCHEMES[scheme]]) == 0


@pytest.fixture(params=[(scheme, "bfloat16") for scheme in OUR_SCHEMES] + [("int4", "float32")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def our_checkpoint(request, tmp_path) -> tuple[Path, Path, str]:
    """(source, quantized by `bamba quantize`, scheme) for a tiny random hybrid transformers
    saved in bf16 (as Bamba ships: bf16 scales, as llm-compressor writes them) or float32."""
    scheme, dtype = request.param
    source, target = tmp_path / "source", tmp_path / f"quantized-{scheme}"
    hf_model("hybrid", **OURS).to(getattr(torch, dtype)).save_pretrained(source)
    quantize_ours(source, target, scheme)
    return source, target, scheme


def test_transformers_reads_our_checkpoint_within_the_formats_rounding(our_checkpoint):
    source, target, scheme = our_checkpoint
    dense, stored = file_tensors(source), file_tensors(target)
    prefixes = quantized_prefixes(stored)
    assert any(p.endswith("mamba.in_proj") for p in prefixes)
    assert any(p.endswith("mamba.out_proj") for p in prefixes)
    assert "lm_head" not in prefixes
    hf = load_hf_weight_only(target)
    ids = random_ids(2, 13)
    ref = hf_logits(hf, ids)  # compressed-tensors decompresses each weight on the first forward
    for prefix in prefixes:
        theirs = hf.get_submodule(prefix).weight.detach()
        source_weight = dense[f"{prefix}.weight"].float()
        bound = rounding_bound(source_weight, stored[f"{prefix}.weight_scale"], scheme)
        excess = ((theirs.float() - source_weight).abs() - bound).max().item()
        assert excess <= 0, f"{prefix}: transformers' weight off the source by {excess:.3g} " \
                            "more than the format's rounding"
    ours = from_pretrained(target)
    with torch.no_grad():
        assert_logits_close(ours(ids), ref)


@torch.no_grad()
def transformers_greedy(model: nn.Module, prompts: torch.Tensor, steps: int) -> list[list[int]]:
    """transformers' greedy tokens (full forward each step), each row cut before its first step
    whose top-2 logit gap is under MIN_MARGIN: there float32 noise may pick either token."""
    ids, clear = prompts, torch.full((prompts.shape[0],), steps)
    for step in range(steps):
        top = model(ids, use_cache=False).logits[:, -1].topk(2)
        unclear = (top.values[:, 0] - top.values[:, 1] < MIN_MARGIN) & (clear == steps)
        clear[unclear] = step
        ids = torch.cat([ids, top.indices[:, :1]], dim=1)
    return [row[prompts.shape[1]:prompts.shape[1] + n].tolist() for row, n in zip(ids, clear)]


def test_our_checkpoint_gives_transformers_greedy_tokens(our_checkpoint):
    """With the activations as they are: int8 activations (bamba's default for integer
    weights, at every row count) move logits by up to ~0.3, far more than MIN_MARGIN
    (their distance to transformers' logits is held by
    ``test_llmcompressor_checkpoint_in_bf16_stays_near_transformers_logits``)."""
    _, target, _ = our_checkpoint
    prompts = random_ids(4, 9, seed=3)
    theirs = transformers_greedy(load_hf_weight_only(target), prompts, NEW_TOKENS)
    assert sum(map(len, theirs)) >= NEW_TOKENS, "too few greedy steps with a clear top token"
    quant_ops.set_int8_activations(False)
    try:
        ours = bamba_greedy(from_pretrained(target), prompts, NEW_TOKENS)
    finally:
        quant_ops.set_int8_activations(True)
    assert [row[:len(t)] for row, t in zip(ours, theirs)] == theirs


@pytest.mark.parametrize("head", ["int8", "fp8"])
def test_transformers_reads_our_quantized_lm_head(tmp_path, head):
    """`--lm-head` adds a config group naming lm_head (a "mixed-precision" config beside int4
    linears when fp8): transformers quantizes the same module and gives our logits. (Quantized
    embeddings, `--embedding`, transformers cannot load: its weight initialisation reads the
    Embedding's ``weight``, which compressed-tensors has replaced; bamba alone reads those.)"""
    source, target = tmp_path / "source", tmp_path / "quantized"
    hf_model("hybrid", **OURS).to(torch.bfloat16).save_pretrained(source)
    assert bamba_main(["quantize", str(source), str(target), "--scheme", "int4", "--group-size",
                       str(GROUP), "--lm-head", head, "--no-progress"]) == 0
    assert "lm_head" in quantized_prefixes(file_tensors(target))
    ids = random_ids(2, 13)
    ref = hf_logits(load_hf(target), ids)
    ours = from_pretrained(target)
    assert isinstance(ours.lm_head, QuantizedLinear)
    with torch.no_grad():
        assert_logits_close(ours(ids), ref)
