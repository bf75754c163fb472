"""The model's fast paths against transformers (float32 logits within 1e-4) and each other.

The scan runs in 64-step chunks whatever the config's chunk size, decode updates the cache's
float32 state in place, and bf16 models read the scan out in bf16: these checks pin each of
those to transformers' reference or to the eager float32 path. The compiled decode step
(bamba.compile) is checked against eager decode in a slow test (inductor takes minutes).
"""

from __future__ import annotations

import pytest
import torch
from conftest import hf_logits, hf_model, random_ids

from bamba.cache import ContiguousCache
from bamba.config import BambaConfig
from bamba.model import BambaLM, init_weights

ATOL = 1e-4
# Longer than one 64-step scan chunk and than the config's chunk, and not a multiple of either.
LENGTH = 150


def _pair(groups: int, chunk: int = 128) -> tuple[torch.nn.Module, BambaLM]:
    hf = hf_model("hybrid", seed=groups, mamba_n_groups=groups, mamba_chunk_size=chunk)
    ours = BambaLM(BambaConfig.from_hf_dict(hf.config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict())
    return hf, ours


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("groups", [1, 2])
def test_full_forward_matches_transformers(groups):
    hf, ours = _pair(groups)
    ids = random_ids(2, LENGTH, seed=groups)
    with torch.no_grad():
        assert _max_diff(ours(ids), hf_logits(hf, ids)) <= ATOL


@pytest.mark.parametrize("groups", [1, 2])
def test_prefill_then_in_place_decode_matches_transformers(groups):
    hf, ours = _pair(groups)
    ids = random_ids(1, LENGTH, seed=10 + groups)
    prompt, steps = 100, LENGTH - 100
    ref = hf_logits(hf, ids)
    cache = ContiguousCache(ours.config, 1, LENGTH, torch.float32)
    layer = ours.config.mamba_layer_indices[0]
    state_before = cache.ssm[layer]
    with torch.no_grad():
        assert _max_diff(ours(ids[:, :prompt], cache=cache), ref[:, :prompt]) <= ATOL
        for t in range(prompt, prompt + steps):
            logits = ours(ids[:, t:t + 1], positions=torch.tensor([[t]]), cache=cache)
            assert _max_diff(logits[:, 0], ref[:, t]) <= ATOL, f"decode step at position {t}"
    assert cache.ssm[layer] is state_before  # updated in place, never replaced


def test_chunked_prefill_matches_one_shot_and_transformers():
    hf, ours = _pair(2, chunk=32)
    ids = random_ids(2, LENGTH, seed=3)
    ref = hf_logits(hf, ids)
    cache = ContiguousCache(ours.config, 2, LENGTH, torch.float32)
    pieces = [(0, 41), (41, 107), (107, LENGTH)]
    with torch.no_grad():
        for start, end in pieces:
            positions = torch.arange(start, end).expand(2, -1)
            logits = ours(ids[:, start:end], positions=positions, cache=cache)
            assert _max_diff(logits, ref[:, start:end]) <= ATOL, f"piece {start}:{end}"


def test_bf16_model_stays_close_to_float32():
    torch.manual_seed(0)
    config = BambaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=32,
                         mamba_d_state=16, mamba_n_groups=2, mamba_chunk_size=256)
    model = init_weights(BambaLM(config), seed=0).eval()
    ids = random_ids(1, LENGTH, seed=4, vocab=256)
    with torch.no_grad():
        ref = model(ids)
        low = model.to(torch.bfloat16)(ids).float()
    # bf16 weights and activations: a few percent of the logit scale, not an exact match
    assert _max_diff(low, ref) <= 0.05 * ref.abs().max().item()


@pytest.mark.slow
def test_compiled_prefill_and_decode_match_eager():
    from bamba.compile import CompiledForward

    config = BambaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=32,
                         mamba_d_state=16, mamba_n_groups=1, mamba_chunk_size=64)
    model = init_weights(BambaLM(config), seed=0).eval()
    ids = random_ids(2, 20, seed=5, vocab=256)
    eager_cache, compiled_cache = (ContiguousCache(config, 2, 32, torch.float32) for _ in "ab")
    decode = CompiledForward(model, "default")
    with torch.inference_mode():
        eager = model(ids, cache=eager_cache)[:, -1]
        compiled = decode(ids, torch.arange(20).expand(2, -1), compiled_cache)
        assert _max_diff(compiled, eager) <= 1e-4, "prefill"
        tok = eager.argmax(-1, keepdim=True)
        for t in range(20, 26):
            pos = torch.full((2, 1), t)
            eager = model(tok, positions=pos, cache=eager_cache)[:, -1]
            compiled = decode(tok, pos, compiled_cache)
            assert _max_diff(compiled, eager) <= 1e-4, f"position {t}"
            tok = eager.argmax(-1, keepdim=True)
        with pytest.raises(ValueError, match="all of its rows"):
            decode(tok[:1], pos[:1], compiled_cache.bind([1]))
    assert decode.compile_seconds > 0


def test_compiled_forward_rejects_bad_calls_before_compiling():
    from bamba.compile import CompiledForward, inductor_options

    config = BambaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_layer_indices=[1],
                         mamba_n_heads=2, mamba_d_head=32, mamba_d_state=8)
    model = BambaLM(config).eval()
    step = CompiledForward(model)
    cache = ContiguousCache(config, 2, 8, torch.float32)
    tok = torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="batch, length"):
        step(tok, torch.zeros(2, 2, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="all of its rows"):
        step(tok[:1], tok[:1], cache.bind([0]))
    with pytest.raises(ValueError, match="beyond the cache length 8"):
        step(tok, torch.full((2, 1), 8), cache.bind([0, 1]))
    with pytest.raises(ValueError, match="compile mode"):
        inductor_options("fastest")
    assert inductor_options("max-autotune")["freezing"] is True
    assert step.compiles == [] and step.compile_seconds == 0.0


@pytest.mark.slow
def test_generate_cli_with_compiled_decode(capsys) -> None:
    from bamba.cli import main

    assert main(["generate", "--prompt", "Hello", "--max-new-tokens", "6", "--compile",
                 "default"]) == 0
    assert "compiled the decode step (default)" in capsys.readouterr().err
