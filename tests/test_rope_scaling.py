"""RoPE scaling against transformers: inverse frequencies and attention factors of every type
equal ``modeling_rope_utils.ROPE_INIT_FUNCTIONS``; logits of a hybrid (and its all-attention
twin) on a 2K-token input equal transformers' with each scaling; cached decode across the
original length equals transformers' ``generate``; config.json read and written back
unchanged; bad scalings are one-line ValueErrors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import hf_logits, hf_model, load_hf, random_ids

from bamba.cache import ContiguousCache
from bamba.checkpoint import from_pretrained, save_pretrained
from bamba.config import BambaConfig, with_rope_scaling
from bamba.model import BambaLM, init_weights
from bamba.ops.rope import ROPE_TYPES, inv_freq_and_factor, rope_cos_sin

ATOL = 1e-4  # the parity tests' float32 logit tolerance
# head_dim 32: Bamba rotates 16 channels (8 frequencies), its Llama twin all 32 (16).
WIDE = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, mamba_n_heads=4,
            mamba_d_head=32, max_position_embeddings=1024)
OURS = dict(vocab_size=320, intermediate_size=48, num_hidden_layers=4, attn_layer_indices=[1, 3],
            mamba_d_state=8, **WIDE)


def longrope(n: int, original: int, factor: float | None = 4.0) -> dict:
    scaling = {"rope_type": "longrope", "short_factor": [1.0 + i / 16 for i in range(n)],
               "long_factor": [1.0 + i for i in range(n)],
               "original_max_position_embeddings": original}
    return scaling if factor is None else {**scaling, "factor": factor}


# Several configurations of every type; the lists have rotary_dim / 2 = 8 entries (Bamba).
SCALINGS = {
    "linear-2": {"rope_type": "linear", "factor": 2.0},
    "linear-legacy-type": {"type": "linear", "factor": 8},
    "dynamic-2": {"rope_type": "dynamic", "factor": 2.0},
    "dynamic-6": {"rope_type": "dynamic", "factor": 6},
    "yarn-4": {"rope_type": "yarn", "factor": 4.0},
    "yarn-betas-original": {"rope_type": "yarn", "factor": 8.0, "beta_fast": 16,
                            "beta_slow": 2, "original_max_position_embeddings": 256},
    "yarn-mscale-untruncated": {"rope_type": "yarn", "factor": 4.0, "mscale": 1.0,
                                "mscale_all_dim": 0.5, "truncate": False},
    "yarn-attention-factor": {"rope_type": "yarn", "factor": 2.0, "attention_factor": 0.9},
    "longrope-4": longrope(8, 256),
    "longrope-no-factor": longrope(8, 256, factor=None),
    "longrope-attention-factor": {**longrope(8, 512), "attention_factor": 1.3},
    "llama3-8": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "llama3-4": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0,
                 "high_freq_factor": 8.0, "original_max_position_embeddings": 128},
}


def hf_bamba_config(scaling: dict, **overrides):
    from transformers import BambaConfig as HFBambaConfig

    return HFBambaConfig(**{**OURS, **overrides},
                         rope_parameters={**json.loads(json.dumps(scaling)), "rope_theta": 10000.0})


@pytest.mark.parametrize("name", sorted(SCALINGS))
@pytest.mark.parametrize("seq_len", [None, 100, 1024, 1025, 3000])
def test_inverse_frequencies_and_attention_factor_equal_transformers(name, seq_len):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = SCALINGS[name]
    kind = scaling.get("rope_type") or scaling["type"]
    hf = hf_bamba_config(scaling)
    want, want_factor = ROPE_INIT_FUNCTIONS[kind](hf, None, seq_len=seq_len)
    got, got_factor = inv_freq_and_factor(BambaConfig(**OURS, rope_scaling=scaling).rope_spec,
                                          seq_len)
    assert got.dtype == torch.float32 and got.shape == (8,)
    # transformers computes dynamic NTK's base in float64 for a Python length, float32 for a
    # tensor one (as its forward passes it, and as here): one rounding apart at most.
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert got_factor == pytest.approx(want_factor, rel=1e-12)


def test_the_scalings_do_change_the_frequencies():
    plain, _ = inv_freq_and_factor(BambaConfig(**OURS).rope_spec)
    for name, scaling in SCALINGS.items():
        spec = BambaConfig(**OURS, rope_scaling=scaling).rope_spec
        got, factor = inv_freq_and_factor(spec, 4096)
        assert not torch.equal(got, plain) or factor != 1.0, name


def test_fixed_frequencies_are_kept_per_scaling_and_serve_autograd_later():
    """The cos and sin of a length-independent spec come from inverse frequencies computed
    once per spec: every scaling keeps its own, equal to computing them afresh, and those first
    made under inference mode serve a later forward that records autograd."""
    positions = torch.arange(40)[None]
    for scaling in [None] + [s for s in SCALINGS.values()
                             if BambaConfig(**OURS, rope_scaling=s).rope_spec.rope_type
                             not in ("dynamic", "longrope")]:
        spec = BambaConfig(**OURS, rope_scaling=scaling).rope_spec
        inv_freq, factor = inv_freq_and_factor(spec)
        angles = positions.float()[..., None] * inv_freq
        want = torch.cat((angles, angles), dim=-1).cos() * factor
        with torch.inference_mode():
            rope_cos_sin(positions, spec, torch.float32)
        cos, _ = rope_cos_sin(positions, spec, torch.float32)  # kept from the call before
        torch.testing.assert_close(cos, want, rtol=0, atol=0)
    q = torch.randn(1, 40, 1, 16, requires_grad=True)
    (q * rope_cos_sin(positions, spec, torch.float32)[0][:, :, None]).sum().backward()
    assert q.grad is not None


def test_length_dependent_types_choose_per_row_and_token():
    """Dynamic NTK and LongRoPE follow each token's length: rows of one call are independent,
    and a chunk of a long prompt told the prompt's length equals the whole prompt's forward."""
    for scaling in (SCALINGS["dynamic-2"], SCALINGS["longrope-4"]):
        spec = BambaConfig(**OURS, rope_scaling=scaling).rope_spec
        positions = torch.stack([torch.arange(1500), torch.arange(1500) + 600])
        both = rope_cos_sin(positions, spec, torch.float32)
        for row in range(2):
            alone = rope_cos_sin(positions[row:row + 1], spec, torch.float32)
            torch.testing.assert_close(both[0][row], alone[0][0], rtol=0, atol=1e-5)
        whole = rope_cos_sin(torch.arange(3000)[None], spec, torch.float32)
        chunk = rope_cos_sin(torch.arange(200)[None], spec, torch.float32,
                             torch.full((1, 200), 3000))
        torch.testing.assert_close(chunk[1], whole[1][:, :200], rtol=0, atol=1e-5)
        short = rope_cos_sin(torch.arange(200)[None], spec, torch.float32)
        assert not torch.equal(short[1], chunk[1])


# ---- logits against transformers -------------------------------------------------------------
def _check_logits(make_hf_checkpoint, kind: str, scaling: dict, length: int, **overrides) -> None:
    params = {**json.loads(json.dumps(scaling)), "rope_theta": 10000.0}
    directory = make_hf_checkpoint(kind, rope_parameters=params, **{**WIDE, **overrides})
    ids = random_ids(1, length, seed=length)
    ref = hf_logits(load_hf(directory), ids)
    model = from_pretrained(directory)
    assert model.config.rope_scaling is not None
    with torch.no_grad():
        got = model(ids)
    diff = (got - ref).abs().max().item()
    assert diff <= ATOL, f"max abs logit difference {diff:.3g} > {ATOL}"


@pytest.mark.parametrize("name", ["linear-2", "dynamic-2", "yarn-4", "longrope-4", "llama3-8"])
def test_hybrid_logits_equal_transformers_on_2k_tokens(make_hf_checkpoint, name):
    """2048 tokens, twice the configured context: dynamic NTK and LongRoPE's long factors on."""
    _check_logits(make_hf_checkpoint, "hybrid", SCALINGS[name], 2048)


@pytest.mark.parametrize("scaling", [{"rope_type": "yarn", "factor": 4.0}, longrope(16, 512),
                                     {"rope_type": "dynamic", "factor": 3.0}],
                         ids=["yarn", "longrope", "dynamic"])
def test_llama_twin_logits_equal_transformers(make_hf_checkpoint, scaling):
    _check_logits(make_hf_checkpoint, "llama", scaling, 2048, head_dim=32)


@pytest.mark.parametrize("name", ["dynamic-2", "longrope-4"])
def test_cached_decode_across_the_original_length_equals_transformers_generate(
        make_hf_checkpoint, name):
    """A prompt just inside the context, then decode past it: transformers recomputes the
    frequencies for every step's length; so does bamba's cached decode."""
    scaling = {**SCALINGS[name], "original_max_position_embeddings": 64} \
        if name.startswith("longrope") else SCALINGS[name]
    params = {**json.loads(json.dumps(scaling)), "rope_theta": 10000.0}
    directory = make_hf_checkpoint("hybrid", rope_parameters=params,
                                   **{**WIDE, "max_position_embeddings": 64})
    prompt = random_ids(1, 56, seed=3)
    hf = load_hf(directory)
    with torch.no_grad():
        out = hf.generate(prompt, max_new_tokens=16, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, pad_token_id=0)
    ref = torch.stack(out.logits, dim=1)  # [1, 16, V]
    model = from_pretrained(directory)
    tokens = out.sequences[0, 56:]
    cache = ContiguousCache(model.config, 1, 72, torch.float32).bind([0])
    with torch.no_grad():
        steps = [model(prompt, cache=cache)[:, -1]]
        for i in range(15):
            steps.append(model(tokens[None, i:i + 1], positions=torch.tensor([[56 + i]]),
                               cache=cache)[:, -1])
    got = torch.stack(steps, dim=1)
    assert (got - ref).abs().max().item() <= ATOL
    # the long-context frequencies did come in: the plain model's logits differ past 64
    plain = from_pretrained(directory, rope_scaling={"rope_type": "default"})
    with torch.no_grad():
        plain_logits = plain(out.sequences[:, :-1])[:, 55:]
    assert (plain_logits[:, 10:] - ref[:, 10:]).abs().max().item() > 1e-3


# ---- config.json ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_config_json_round_trip_keeps_the_scaling(name):
    raw = {**BambaConfig(**OURS).to_hf_dict(),
           "rope_parameters": {**SCALINGS[name], "rope_theta": 5e5,
                               "partial_rotary_factor": 0.5}}
    config = BambaConfig.from_hf_dict(json.loads(json.dumps(raw)))
    written = config.to_hf_dict()["rope_parameters"]
    assert {k: written[k] for k in raw["rope_parameters"]} == raw["rope_parameters"]
    assert written["rope_type"] == ROPE_TYPES[ROPE_TYPES.index(SCALINGS[name].get(
        "rope_type") or SCALINGS[name]["type"])]
    assert BambaConfig.from_hf_dict(json.loads(json.dumps(config.to_hf_dict()))) == config
    assert config.rope_theta == 5e5


def test_legacy_rope_scaling_with_a_top_level_theta_reads_as_transformers_reads_it():
    raw = {**BambaConfig(**OURS).to_hf_dict(), "rope_theta": 5e5,
           "rope_scaling": {"type": "yarn", "factor": 4}}
    del raw["rope_parameters"]
    config = BambaConfig.from_hf_dict(raw)
    assert config.rope_scaling == {"rope_type": "yarn", "type": "yarn", "factor": 4}
    assert config.rope_theta == 5e5 and config.context_length == 4 * 1024
    written = config.to_hf_dict()["rope_parameters"]
    assert written == {"rope_type": "yarn", "type": "yarn", "factor": 4, "rope_theta": 5e5,
                       "partial_rotary_factor": 0.5}


def test_saved_scaled_checkpoint_loads_in_transformers_with_the_same_scaling(tmp_path):
    scaling = SCALINGS["longrope-4"]
    model = init_weights(BambaLM(BambaConfig(**OURS, rope_scaling=scaling)), seed=0).eval()
    save_pretrained(model, tmp_path / "ckpt")
    hf = load_hf(tmp_path / "ckpt")
    for key, value in scaling.items():
        assert hf.config.rope_parameters[key] == value
    ids = random_ids(1, 300, seed=2)
    with torch.no_grad():
        assert (model(ids) - hf_logits(hf, ids)).abs().max().item() <= ATOL
    assert from_pretrained(tmp_path / "ckpt").config == model.config


def test_context_length_follows_the_scaling():
    assert BambaConfig(**OURS).context_length == 1024
    assert BambaConfig(**OURS, rope_scaling={"rope_type": "yarn", "factor": 4}).context_length \
        == 4096
    assert BambaConfig(**OURS, rope_scaling=SCALINGS["llama3-8"]).context_length == 1024
    assert BambaConfig(**OURS, rope_scaling=SCALINGS["longrope-4"]).context_length == 1024
    assert BambaConfig(**{**OURS, "max_position_embeddings": 4096},
                       rope_scaling=SCALINGS["longrope-4"]).context_length == 4096
    assert BambaConfig(**OURS, rope_scaling={"rope_type": "default"}).rope_scaling is None


def test_from_pretrained_overrides_the_checkpoints_scaling(make_hf_checkpoint):
    directory = make_hf_checkpoint("hybrid", **WIDE)
    assert from_pretrained(directory).config.rope_scaling is None
    model = from_pretrained(directory, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    assert model.config.rope_scaling == {"rope_type": "yarn", "factor": 4.0}
    assert model.config.context_length == 4096
    themed = with_rope_scaling(model.config, {"rope_type": "linear", "factor": 2,
                                              "rope_theta": 1e6})
    assert themed.rope_theta == 1e6 and themed.rope_scaling == {"rope_type": "linear",
                                                                "factor": 2}


# ---- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize("scaling, fragment", [
    ({"rope_type": "ntk-by-parts", "factor": 2}, "unknown rope_type 'ntk-by-parts'"),
    ({"type": "stretch"}, "unknown rope_type 'stretch'"),
    ({"rope_type": "longrope", "short_factor": [1.0] * 8}, "needs long_factor"),
    ({"rope_type": "yarn"}, "needs factor"),
    ({"rope_type": "llama3", "factor": 8}, "needs low_freq_factor, high_freq_factor"),
    ({"rope_type": "linear", "factor": 0.5}, "factor must be >= 1, got 0.5"),
    ({"rope_type": "dynamic", "factor": "4"}, "factor must be a number"),
    ({**longrope(8, 256), "long_factor": [1.0] * 7}, "long_factor must be a list of 8"),
    ({**longrope(8, 256), "short_factor": [1.0] * 7 + [0]}, "short_factor must be a list of 8"),
    ({"rope_type": "yarn", "factor": 2, "attention_factor": 0}, "attention_factor must be > 0"),
    ({"rope_type": "yarn", "factor": 2, "original_max_position_embeddings": 1.5},
     "original_max_position_embeddings must be a positive integer"),
    ({"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 1},
     "high_freq_factor (1) must exceed low_freq_factor (4)"),
])
def test_bad_scalings_are_one_line_value_errors(scaling, fragment, tmp_path):
    with pytest.raises(ValueError) as info:
        BambaConfig(**OURS, rope_scaling=scaling)
    message = str(info.value)
    assert fragment in message and "\n" not in message and message.startswith("rope_scaling: ")
    raw = {**BambaConfig(**OURS).to_hf_dict(), "rope_parameters": scaling}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="config.json: rope_scaling: "):
        BambaConfig.from_json_file(tmp_path / "config.json")
