"""bamba against transformers on checkpoints transformers itself made: float32 logits within 1e-4.

Covers n_groups > 1, lengths around the chunk size (8), tied/untied embeddings, batch > 1,
all-Mamba, all-attention (Bamba and Llama), cached decode, chunked prefill, and saving with
bamba for transformers to load.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import hf_logits, hf_model, load_hf, perturb, random_ids

from bamba.cache import ContiguousCache
from bamba.checkpoint import from_pretrained, save_pretrained
from bamba.config import BambaConfig
from bamba.model import BambaLM, init_weights

ATOL = 1e-4


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, atol: float = ATOL) -> None:
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff <= atol, f"max abs logit difference {diff:.3g} > {atol}"


def check_parity(directory: Path, batch: int, length: int) -> None:
    ids = random_ids(batch, length, seed=length)
    ref = hf_logits(load_hf(directory), ids)
    model = from_pretrained(directory)
    with torch.no_grad():
        assert_logits_close(model(ids), ref)


@pytest.mark.parametrize("length", [1, 5, 8, 13, 37])  # chunk 8: below, at, between, several
def test_hybrid_matches_transformers_across_lengths(make_hf_checkpoint, length):
    check_parity(make_hf_checkpoint("hybrid", mamba_n_groups=2), batch=2, length=length)


@pytest.mark.parametrize("groups", [1, 4])
def test_hybrid_matches_transformers_across_group_counts(make_hf_checkpoint, groups):
    check_parity(make_hf_checkpoint("hybrid", mamba_n_groups=groups), batch=3, length=21)


def test_time_step_limits_clamp_like_transformers_in_prefill(make_hf_checkpoint, tmp_path):
    directory = make_hf_checkpoint("hybrid", time_step_limit=(0.05, 0.4))
    model = from_pretrained(directory)
    assert model.config.time_step_limit == (0.05, 0.4)
    check_parity(directory, batch=2, length=19)
    save_pretrained(model, tmp_path / "resaved")
    assert load_hf(tmp_path / "resaved").config.time_step_limit in ((0.05, 0.4), [0.05, 0.4])


@pytest.mark.parametrize("tied", [True, False])
def test_tied_and_untied_embeddings_match(make_hf_checkpoint, tied):
    directory = make_hf_checkpoint("hybrid", tie_word_embeddings=tied)
    check_parity(directory, batch=2, length=19)
    model = from_pretrained(directory)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied


@pytest.mark.parametrize("length", [6, 29])
def test_all_mamba_matches_transformers(make_hf_checkpoint, length):
    check_parity(make_hf_checkpoint("mamba"), batch=2, length=length)


@pytest.mark.parametrize("kind", ["attention", "llama"])
def test_all_attention_matches_transformers(make_hf_checkpoint, kind):
    check_parity(make_hf_checkpoint(kind), batch=2, length=23)


def test_llama_with_tied_embeddings_and_grouped_heads(make_hf_checkpoint):
    directory = make_hf_checkpoint("llama", tie_word_embeddings=True, num_key_value_heads=1)
    check_parity(directory, batch=2, length=17)


@torch.no_grad()
def run_in_pieces(model: BambaLM, ids: torch.Tensor, pieces: list[int]) -> torch.Tensor:
    """Logits of ``ids`` fed through a ContiguousCache in consecutive pieces of these lengths."""
    b, total = ids.shape
    assert sum(pieces) == total
    cache = ContiguousCache(model.config, rows=b, max_len=total, dtype=torch.float32)
    out, start = [], 0
    for n in pieces:
        positions = torch.arange(start, start + n).expand(b, n)
        out.append(model(ids[:, start:start + n], positions=positions, cache=cache))
        start += n
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("kind", ["hybrid", "mamba", "llama"])
def test_prefill_then_token_by_token_decode_matches_full_forward(make_hf_checkpoint, kind):
    directory = make_hf_checkpoint(kind)
    ids = random_ids(2, 21, seed=3)
    ref = hf_logits(load_hf(directory), ids)
    model = from_pretrained(directory)
    assert_logits_close(run_in_pieces(model, ids, [11] + [1] * 10), ref)


def test_chunked_prefill_with_carried_state_matches_one_shot(make_hf_checkpoint):
    directory = make_hf_checkpoint("hybrid", mamba_n_groups=2)
    ids = random_ids(2, 37, seed=4)
    model = from_pretrained(directory)
    with torch.no_grad():
        one_shot = model(ids)
    assert_logits_close(run_in_pieces(model, ids, [5, 8, 13, 11]), one_shot)
    assert_logits_close(one_shot, hf_logits(load_hf(directory), ids))


@pytest.mark.parametrize("kind,tied", [("hybrid", False), ("mamba", True), ("llama", False)])
def test_round_trip_transformers_to_bamba_to_transformers(make_hf_checkpoint, tmp_path, kind, tied):
    directory = make_hf_checkpoint(kind, tie_word_embeddings=tied)
    ids = random_ids(2, 15, seed=5)
    ref = hf_logits(load_hf(directory), ids)
    save_pretrained(from_pretrained(directory), tmp_path / "resaved", max_shard_size=20_000)
    assert (tmp_path / "resaved" / "model.safetensors.index.json").is_file()
    reloaded = load_hf(tmp_path / "resaved")
    expected = "LlamaForCausalLM" if kind == "llama" else "BambaForCausalLM"
    assert type(reloaded).__name__ == expected
    assert_logits_close(hf_logits(reloaded, ids), ref)


@pytest.mark.parametrize("model_type,layers", [("bamba", [2]), ("llama", [0, 1, 2])])
def test_model_made_by_bamba_loads_in_transformers(tmp_path, model_type, layers):
    config = BambaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, attn_layer_indices=layers,
                         mamba_n_heads=4, mamba_d_state=8, mamba_n_groups=2, mamba_chunk_size=8,
                         initializer_range=0.2, model_type=model_type,
                         partial_rotary_factor=0.5 if model_type == "bamba" else 1.0)
    model = init_weights(BambaLM(config), seed=0).eval()
    perturb(model, seed=1)
    model.save_pretrained(tmp_path / "ours")
    ids = random_ids(2, 13, seed=6, vocab=96)
    with torch.no_grad():
        ours = model(ids)
    assert_logits_close(hf_logits(load_hf(tmp_path / "ours"), ids), ours)


def test_bfloat16_load_runs_and_stays_close_to_float32(make_hf_checkpoint):
    directory = make_hf_checkpoint("hybrid")
    ids = random_ids(2, 21, seed=7)
    model = from_pretrained(directory, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        low = model(ids).float()
    ref = hf_logits(load_hf(directory), ids)
    assert torch.isfinite(low).all()
    scale = ref.abs().max().item()
    # bf16 carries ~3 significant digits; transformers' own bf16 load strays as far.
    assert (low - ref).abs().mean().item() <= 0.02 * scale
    assert (low - ref).abs().max().item() <= 0.15 * scale
    assert (low.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9


def test_hf_model_fixture_perturbs_constant_parameters():
    model = hf_model("hybrid")
    a_log = model.model.layers[0].mamba.A_log
    assert a_log.std() > 0.1 and model.model.final_layernorm.weight.std() > 0.05
