"""Prompt scoring through /v1/completions as lm-eval's ``local-completions`` uses it: token-id
prompts (several per request), ``echo`` with ``logprobs`` returning every prompt token's
logprob and top logprobs in the legacy shape, equal to a plain forward's log_softmax; and the
engine's ``prompt_logprobs`` under chunked prefill, prefix caching and ``max_tokens`` 0."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from bamba.engine import LLM, SamplingParams  # noqa: E402
from bamba.serve.app import build_app  # noqa: E402
from bamba.serve.async_engine import AsyncEngine  # noqa: E402
from scoring_helpers import forward_logprobs, plain_model  # noqa: E402
from serve_helpers import running, save_tiny_checkpoint  # noqa: E402

NAME = "tiny-bamba"
TEXT = "The hybrid model mixes Mamba2 layers with a few attention layers. State space models"
TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("echo") / "ckpt")


@pytest.fixture(scope="module")
def server(checkpoint: Path) -> Iterator[tuple[str, AsyncEngine]]:
    # Prefill chunks of 8 tokens and a warm prefix cache: prompt logprobs come chunk by chunk.
    llm = LLM(str(checkpoint), memory_gb=0.005, block_size=4, max_num_batched_tokens=8,
              max_model_len=128)
    engine = AsyncEngine(llm).start()
    with running(build_app(engine, NAME)) as base:
        yield base, engine
    engine.shutdown()


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> torch.nn.Module:
    return plain_model(checkpoint)


def post(base: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base}/v1/completions", json={"model": NAME, **body}, timeout=60)


def test_echo_logprobs_equal_the_forward_log_softmax(server, reference) -> None:
    base, engine = server
    decode = engine.llm.tokenizer.decode
    ids = engine.llm.tokenizer.encode(TEXT)
    assert len(ids) > 20  # several prefill chunks of 8
    assert post(base, {"prompt": ids, "max_tokens": 2}).status_code == 200  # warms the cache
    r = post(base, {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 3})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    want = forward_logprobs(reference, ids)
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None
    assert lp["top_logprobs"][0] is None
    expected = want[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(lp["token_logprobs"][1:]), expected, atol=TOL)
    for position, top in enumerate(lp["top_logprobs"][1:]):
        values, top_ids = want[position].topk(3)
        # keyed by text as OpenAI does (ids that decode alike, like byte pieces, share a key)
        expected_top = {decode([t], skip_special_tokens=False): v
                        for t, v in zip(top_ids.tolist(), values.tolist(), strict=True)}
        assert set(top) == set(expected_top)
        assert all(abs(top[k] - v) < TOL for k, v in expected_top.items())
    assert choice["text"] == TEXT and lp["tokens"] == [decode([t]) for t in ids]
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(ids))]
    assert r.json()["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0,
                                 "total_tokens": len(ids)}


def test_token_id_batches_as_lm_eval_sends_them(server, reference) -> None:
    """Several token-id prompts, echo, logprobs 1, max_tokens 1, temperature 0: each choice
    holds its prompt's tokens and then the greedy token, with their logprobs."""
    base, engine = server
    tok = engine.llm.tokenizer
    prompts = [tok.encode(TEXT[:n]) for n in (60, 25, 84)]
    body = {"prompt": prompts, "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0,
            "seed": 1234}
    r = post(base, body)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1, 2]
    for ids, choice in zip(prompts, choices, strict=True):
        lp = choice["logprobs"]
        want = forward_logprobs(reference, ids)
        greedy = int(want[-1].argmax())
        assert len(lp["token_logprobs"]) == len(ids) + 1
        got = torch.tensor(lp["token_logprobs"][1:])
        expected = torch.cat([want[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1),
                              want[-1, greedy:greedy + 1]])
        assert torch.allclose(got, expected, atol=TOL)
        assert lp["tokens"][-1] == tok.decode([greedy], skip_special_tokens=False)
        # lm-eval's greedy check: the chosen logprob equals the top one's, position by position
        is_greedy = [t == max(top.values()) for t, top in
                     zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True)]
        expected_greedy = (want[:-1].argmax(-1) == torch.tensor(ids[1:])).tolist() + [True]
        assert is_greedy == expected_greedy
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == sum(map(len, prompts)) and usage["completion_tokens"] == 3


def test_several_text_prompts_with_n_samples(server) -> None:
    base, _ = server
    r = post(base, {"prompt": ["State space", "Attention layers keep"], "n": 2, "max_tokens": 3,
                    "temperature": 1.0, "seed": 3, "echo": True, "ignore_eos": True})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert sorted(c["index"] for c in choices) == [0, 1, 2, 3]
    by_index = {c["index"]: c for c in choices}
    assert by_index[0]["text"].startswith("State space")
    assert by_index[3]["text"].startswith("Attention layers keep")
    assert all(c["logprobs"] is None for c in choices)
    assert r.json()["usage"]["completion_tokens"] == 12


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "echo": True, "stream": True}, "echo"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 0, "logprobs": 2}, "max_tokens"),
    ({"prompt": ["a", "b"], "stream": True}, "prompt"),
    ({"prompt": [[5, 6], []]}, "prompt"),
    ({"prompt": [[5, 6]] * 257}, "prompt"),
    ({"prompt": [[5, 6]] * 3, "n": 100}, "prompt"),
    ({"prompt": [[5, 6], [5, 10**6]], "echo": True, "logprobs": 1}, "prompt"),
    ({"prompt": "hi", "echo": True, "logprobs": 21}, "logprobs"),
])
def test_invalid_combinations_name_their_param(server, body: dict, param: str) -> None:
    base, engine = server
    r = post(base, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert not engine.llm.has_unfinished_requests()


def test_engine_prompt_logprobs_under_chunks_and_preemption(checkpoint, reference) -> None:
    """Chunked prefill (8 tokens a step) in a KV pool so small that sequences are preempted
    and recomputed: recomputed chunks add nothing twice, and every entry equals the forward."""
    llm = LLM(str(checkpoint), memory_gb=64_000 / 1e9, block_size=4, max_num_batched_tokens=8,
              max_num_seqs=8, snapshot_interval=8)
    ids = llm.tokenizer.encode(TEXT)
    prompts = [ids[:40], ids[:30], ids[5:35], ids[10:45]]
    params = [SamplingParams(max_tokens=30, prompt_logprobs=2, ignore_eos=True)] * 3 + \
        [SamplingParams(max_tokens=0, prompt_logprobs=0)]
    outputs = llm.generate(prompts, params)
    assert llm.stats().num_preemptions > 0
    for out, prompt in zip(outputs, prompts, strict=True):
        entries = out.prompt_logprobs
        assert entries is not None and len(entries) == len(prompt) and entries[0] is None
        want = forward_logprobs(reference, prompt)
        expected = want[:-1].gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)
        assert [e.token_id for e in entries[1:]] == prompt[1:]
        assert torch.allclose(torch.tensor([e.logprob for e in entries[1:]]), expected,
                              atol=TOL)
    last = outputs[-1].outputs[0]
    assert last.token_ids == [] and last.finish_reason == "length"
    assert len(outputs[0].prompt_logprobs[5].top) == 2
    assert llm.stats().num_free_blocks == llm.stats().num_blocks


def test_prompt_logprobs_need_a_full_prefill() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)
