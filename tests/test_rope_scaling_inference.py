"""RoPE scaling through inference: the engine (chunked prefill, batching, prefix cache), the
native decode step and ``generate`` give the plain model's outputs; the context grows with
the scaling; ``--rope-scaling`` on the CLI and the server; prompts too long are one line
(exit 2, HTTP 400)."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch

from bamba.cache import ContiguousCache
from bamba.checkpoint import save_pretrained
from bamba.cli import main
from bamba.config import BambaConfig, preset
from bamba.default_model import byte_tokenizer
from bamba.engine import LLM, SamplingParams
from bamba.generation import GenerationConfig, generate
from bamba.model import BambaLM, init_weights
from bamba.native import accelerate, decode_ops, dispatch

SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=48, num_hidden_layers=4,
             num_attention_heads=2, num_key_value_heads=1, attn_layer_indices=[1, 3],
             mamba_n_heads=4, mamba_d_head=32, mamba_d_state=8, mamba_chunk_size=8,
             initializer_range=0.2, max_position_embeddings=64, eos_token_id=2)
LONGROPE = {"rope_type": "longrope", "short_factor": [1.0 + i / 8 for i in range(8)],
            "long_factor": [1.0 + i for i in range(8)], "factor": 4.0}
SCALINGS = {"yarn": {"rope_type": "yarn", "factor": 4.0}, "longrope": LONGROPE,
            "dynamic": {"rope_type": "dynamic", "factor": 4.0}}


def small_model(scaling: dict | None) -> BambaLM:
    return init_weights(BambaLM(BambaConfig(**SMALL, rope_scaling=scaling)), seed=0).eval()


def prompt(n: int, seed: int = 1) -> list[int]:
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=1)


@torch.no_grad()
def cached_greedy(model: BambaLM, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """The plain model's greedy tokens and their logprobs: the prompt in one forward, then one
    cached step per token (transformers' generate)."""
    cache = ContiguousCache(model.config, 1, len(ids) + n, torch.float32).bind([0])
    logits = model(torch.tensor([ids]), cache=cache)[:, -1]
    tokens, logprobs = [], []
    for i in range(n):
        logp = torch.log_softmax(logits.float(), -1)[0]
        tokens.append(int(logp.argmax()))
        logprobs.append(float(logp[tokens[-1]]))
        logits = model(torch.tensor([[tokens[-1]]]), positions=torch.tensor([[len(ids) + i]]),
                       cache=cache)[:, -1]
    return tokens, logprobs


@torch.no_grad()
def full_forward_greedy(model: BambaLM, ids: list[int], n: int) -> list[int]:
    """A whole-sequence forward for every new token, no cache."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-n:]


@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_engine_equals_the_plain_model_with_scaling(name):
    """Prompts past the original context of 64 (in 16-token chunks, batched with decode rows),
    one prompt inside it that decodes across it: the engine's tokens and logprobs are the
    plain model's cached decode; where every token sees one length (yarn; longrope past 64),
    also a whole-sequence forward's."""
    model = small_model(SCALINGS[name])
    llm = LLM(copy.deepcopy(model), memory_gb=0.002, block_size=4, max_num_batched_tokens=16)
    assert llm.max_model_len == 256  # 4 x 64
    batch = [prompt(100), prompt(40, seed=2), prompt(150, seed=3)]
    outs = llm.generate(batch, greedy(30))
    for ids, out in zip(batch, outs, strict=True):
        tokens, logprobs = cached_greedy(model, ids, 30)
        assert out.outputs[0].token_ids == tokens
        got = torch.tensor([e.logprob for e in out.outputs[0].logprobs])
        torch.testing.assert_close(got, torch.tensor(logprobs), atol=1e-4, rtol=0)
        if name == "yarn" or (name == "longrope" and len(ids) > 64):
            assert tokens == full_forward_greedy(model, ids, 30)


def test_generate_equals_the_engine_with_scaling():
    model = small_model(LONGROPE)
    ids = prompt(50)
    result = generate(model, [ids], GenerationConfig(max_new_tokens=30, ignore_eos=True))[0]
    assert result.token_ids == cached_greedy(small_model(LONGROPE), ids, 30)[0]


def test_prefix_cache_with_yarn_on_equals_off_and_is_off_for_length_dependent_types():
    model = small_model(SCALINGS["yarn"])
    shared = prompt(80)
    batch = [shared + prompt(9, seed=5), shared + prompt(30, seed=6)]
    on = LLM(copy.deepcopy(model), memory_gb=0.002, block_size=4, snapshot_interval=8)
    off = LLM(copy.deepcopy(model), memory_gb=0.002, block_size=4, enable_prefix_caching=False)
    first = on.generate(batch[:1], greedy(5))
    second, want = on.generate(batch[1:], greedy(5)), off.generate(batch, greedy(5))
    assert on.stats().prefix_cache_hit_rate > 0
    assert [o.outputs[0].token_ids for o in first + second] == \
        [o.outputs[0].token_ids for o in want]
    for name in ("longrope", "dynamic"):
        assert LLM(small_model(SCALINGS[name]), memory_gb=0.002, block_size=4).prefix is None


@pytest.mark.skipif(not dispatch.linear_available(torch.float32),
                    reason="the native decode step needs AVX-512 and a C compiler")
@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_native_decode_step_equals_the_torch_path_with_scaling(monkeypatch, name):
    """The whole-model native step (rope inside it) against the torch model: decode from
    positions 4..10 to 13..19 across an original context of 8."""
    scaling = {**SCALINGS[name], "short_factor": [1.0] * 16, "long_factor": [
        1.0 + i for i in range(16)]} if name == "longrope" else SCALINGS[name]
    torch_model = init_weights(BambaLM(preset("tiny", max_position_embeddings=8,
                                              rope_scaling=scaling)), seed=0).eval()
    native = accelerate(copy.deepcopy(torch_model))
    calls = []
    real = decode_ops.decode_layers
    monkeypatch.setattr(decode_ops, "decode_layers",
                        lambda *a, **k: calls.append(1) or real(*a, **k))

    def decode(model: BambaLM) -> torch.Tensor:
        lengths = [4, 7, 10]
        tokens = torch.randint(0, 4096, (3, 20), generator=torch.Generator().manual_seed(1))
        cache = ContiguousCache(model.config, 3, 32, torch.float32)
        with torch.inference_mode():
            for row, n in enumerate(lengths):
                model(tokens[row:row + 1, :n], cache=cache.bind([row]))
            cache.bind([0, 1, 2])
            return torch.cat([model(tokens[:, n:n + 1], positions=torch.tensor(lengths)[:, None]
                                    + n, cache=cache) for n in range(9)], dim=1)

    got = decode(native)
    assert len(calls) == 9
    torch.testing.assert_close(got, decode(torch_model), rtol=1e-4, atol=1e-4)


# ---- the context and the command line ------------------------------------------------------
@pytest.fixture
def checkpoint_dir(tmp_path):
    config = preset("tiny", vocab_size=257, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=4, attn_layer_indices=[1], num_attention_heads=4,
                    mamba_n_heads=2, mamba_d_state=16, bos_token_id=None, eos_token_id=256,
                    pad_token_id=None, initializer_range=0.2, max_position_embeddings=64)
    model = init_weights(BambaLM(config), seed=1)
    return save_pretrained(model, tmp_path / "ckpt", tokenizer=byte_tokenizer())


def _one_line_error(capsys, verb: str, *fragments: str) -> None:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"bamba {verb}: error:"), err
    for fragment in fragments:
        assert fragment in err, err


def test_generate_prompt_past_the_context_is_one_line_until_scaling_extends_it(
        checkpoint_dir, capsys):
    argv = ["generate", "--model", str(checkpoint_dir), "--prompt", "x" * 100,
            "--max-new-tokens", "4", "--threads", "1", "--dtype", "float32"]
    assert main(argv) == 2
    _one_line_error(capsys, "generate", "exceeds the model's context of 64 tokens",
                    "max_position_embeddings", "rope_scaling")
    assert main([*argv, "--rope-scaling", '{"rope_type": "yarn", "factor": 4}']) == 0
    assert "prefill: 100 tokens" in capsys.readouterr().err
    assert main([*argv, "--rope-scaling", '{"rope_type": "linear", "factor": 1.5}']) == 2
    _one_line_error(capsys, "generate", "context of 96 tokens", "rope_type 'linear'")


@pytest.mark.parametrize("verb", ["generate", "chat", "serve"])
@pytest.mark.parametrize("value, fragment", [
    ('{"rope_type": "stretch", "factor": 4}', "unknown rope_type 'stretch'"),
    ('{"rope_type": "yarn", factor: 4}', "--rope-scaling: not valid JSON"),
    ('[4]', "--rope-scaling: expected a JSON object"),
])
def test_bad_rope_scaling_option_is_one_line_before_loading(checkpoint_dir, capsys, verb, value,
                                                            fragment):
    target = ["--model", str(checkpoint_dir), "--prompt", "x"] if verb == "generate" \
        else [str(checkpoint_dir)]
    assert main([verb, *target, "--rope-scaling", value]) == 2
    _one_line_error(capsys, verb, fragment)


@pytest.mark.parametrize("value, fragment", [
    ('{"rope_type": "longrope", "short_factor": [1, 1, 1, 1]}', "needs long_factor"),
    ('{"rope_type": "yarn", "factor": 0.5}', "factor must be >= 1, got 0.5"),
    ('{"rope_type": "longrope", "short_factor": [1, 1, 1, 1], "long_factor": [1, 1]}',
     "long_factor must be a list of 4"),  # head_dim 16, rotary width 8: 4 frequencies
])
def test_bad_rope_scaling_fields_name_the_field(checkpoint_dir, capsys, value, fragment):
    assert main(["generate", "--model", str(checkpoint_dir), "--prompt", "x",
                 "--rope-scaling", value]) == 2
    _one_line_error(capsys, "generate", "rope_scaling: ", fragment)


def test_chat_uses_the_override(checkpoint_dir, capsys, monkeypatch):
    argv = ["chat", str(checkpoint_dir), "--max-new-tokens", "2", "--threads", "1",
            "--dtype", "float32", "--memory-gb", "0.01"]
    for extra, refused in (([], True),
                           (["--rope-scaling", '{"rope_type": "yarn", "factor": 4}'], False)):
        monkeypatch.setattr("sys.stdin", io.StringIO("x" * 100 + "\n"))
        assert main([*argv, *extra]) == 0
        out = capsys.readouterr()
        assert ("context_length" in out.err or "context is 64 tokens" in out.err) == refused, \
            out.err


def test_server_refuses_a_prompt_past_the_context_with_400_and_scaling_extends_it(
        checkpoint_dir):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from bamba.serve.app import build_app
    from bamba.serve.async_engine import AsyncEngine
    from serve_helpers import running

    body = {"model": "m", "prompt": list(range(3, 103)), "max_tokens": 2}
    for scaling, status in ((None, 400), ({"rope_type": "yarn", "factor": 4}, 200)):
        llm = LLM(str(checkpoint_dir), memory_gb=0.01, block_size=4, rope_scaling=scaling)
        engine = AsyncEngine(llm).start()
        try:
            with running(build_app(engine, "m", None)) as base:
                r = httpx.post(base + "/v1/completions", json=body, timeout=60)
                assert r.status_code == status, r.text
                if status == 400:
                    error = r.json()["error"]
                    assert error["code"] == "context_length_exceeded"
                    assert "64 tokens" in error["message"]
                    assert httpx.get(base + "/health").json() == {"status": "ok"}
        finally:
            engine.shutdown()


def test_rope_scaling_help_names_the_types():
    import argparse

    from bamba.cli.inference_options import add_model_options

    parser = argparse.ArgumentParser()
    add_model_options(parser)
    text = json.dumps(parser.format_help())
    assert "--rope-scaling" in text and "longrope" in text and "llama3" in text
