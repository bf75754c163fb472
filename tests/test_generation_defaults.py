"""A checkpoint's generation_config.json as transformers writes it: its EOS ids stop greedy
generation where transformers' ``generate`` stops; its sampling fields and max_new_tokens are
the defaults of ``generate``, ``LLM``, ``bamba generate`` / ``chat`` and the server, which a
caller's own values override; ``--generation-config none`` ignores it; saving keeps it, and a
GGUF file carries it in llama.cpp's keys. A bad value is one line naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bamba.checkpoint import from_pretrained, load_tokenizer, save_pretrained
from bamba.cli import build_parser, main
from bamba.cli.chat import chat_params
from bamba.engine import LLM, SamplingParams
from bamba.generation import GenerationConfig, generate
from bamba.generation_defaults import (GENERATION_CONFIG_NAME, GenerationDefaults,
                                       read_generation_defaults)
from conftest import load_hf
from serve_helpers import save_tiny_checkpoint

PROMPT = [5, 9, 12, 30, 7, 41]
SAMPLING = {"temperature": 0.7, "top_k": 5, "top_p": 0.9, "min_p": 0.05,
            "repetition_penalty": 1.1}


def _save_generation_config(directory: Path, **fields) -> None:
    from transformers import GenerationConfig as HFGenerationConfig

    HFGenerationConfig(**fields).save_pretrained(directory)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return save_tiny_checkpoint(tmp_path / "ckpt")


def test_reads_what_transformers_writes(checkpoint):
    _save_generation_config(checkpoint, do_sample=True, max_new_tokens=12,
                            eos_token_id=[2, 7], **SAMPLING)
    defaults = from_pretrained(checkpoint).generation_defaults
    assert defaults == GenerationDefaults(SAMPLING, 12, (2, 7))
    config = GenerationConfig.for_model(from_pretrained(checkpoint), seed=3)
    assert (config.temperature, config.top_k, config.max_new_tokens, config.seed) == \
        (0.7, 5, 12, 3)
    # what transformers' own save_pretrained writes (token ids only) sets no sampling default
    assert from_pretrained(save_tiny_checkpoint(checkpoint.parent / "plain")
                           ).generation_defaults.sampling == {}


def test_greedy_generation_stops_where_transformers_stops(checkpoint):
    hf = load_hf(checkpoint)
    free = hf.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False
                       )[0, len(PROMPT):].tolist()
    k = next(i for i in range(2, 8) if free[i] not in free[:i])  # a token greedy first emits at i
    eos = hf.config.eos_token_id
    _save_generation_config(checkpoint, eos_token_id=[eos, free[k]], max_new_tokens=8,
                            pad_token_id=hf.config.pad_token_id)
    theirs = load_hf(checkpoint).generate(torch.tensor([PROMPT]))[0, len(PROMPT):].tolist()
    assert theirs == free[:k + 1]
    ours = generate(from_pretrained(checkpoint), [PROMPT])[0]
    assert ours.token_ids == theirs and ours.finish_reason == "stop"
    llm = LLM(str(checkpoint), memory_gb=0.01, max_model_len=64)
    (out,) = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8))
    assert out.outputs[0].token_ids == theirs
    ignored = LLM(str(checkpoint), memory_gb=0.01, max_model_len=64, generation_config="none")
    (out,) = ignored.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8))
    assert out.outputs[0].token_ids == free


def test_llm_default_params_are_the_files_and_a_caller_overrides_them(checkpoint):
    _save_generation_config(checkpoint, do_sample=True, max_new_tokens=5, temperature=0.6,
                            top_k=4)
    llm = LLM(str(checkpoint), memory_gb=0.01, max_model_len=64)
    params = llm.get_default_sampling_params()
    assert (params.temperature, params.top_k, params.top_p, params.max_tokens) == \
        (0.6, 4, 1.0, 5)
    assert len(llm.generate(PROMPT)[0].outputs[0].token_ids) <= 5
    assert LLM(str(checkpoint), memory_gb=0.01, max_model_len=64, generation_config="none"
               ).get_default_sampling_params() == SamplingParams()
    elsewhere = checkpoint.parent / "elsewhere"
    elsewhere.mkdir()
    _save_generation_config(elsewhere, do_sample=True, temperature=0.3)
    assert LLM(str(checkpoint), memory_gb=0.01, max_model_len=64,
               generation_config=str(elsewhere)).get_default_sampling_params().temperature == 0.3


def _cli_text(capsys, argv) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


def test_bamba_generate_takes_the_files_defaults_under_its_flags(checkpoint, capsys):
    _save_generation_config(checkpoint, do_sample=True, max_new_tokens=6, temperature=0.8,
                            top_k=3)
    model = from_pretrained(checkpoint, dtype=torch.bfloat16)
    tokenizer = load_tokenizer(checkpoint)
    ids = tokenizer.encode("abc")
    eos = sorted({*model.config.eos_token_ids, tokenizer.eos_token_id})

    def api(**values) -> str:
        result = generate(model, [ids], GenerationConfig(**values, eos_token_ids=eos))[0]
        return tokenizer.decode(result.token_ids) + "\n"

    base = ["generate", "--model", str(checkpoint), "--prompt", "abc", "--threads", "1"]
    assert _cli_text(capsys, base + ["--seed", "5"]) == \
        api(temperature=0.8, top_k=3, max_new_tokens=6, seed=5)
    assert _cli_text(capsys, base + ["--temperature", "0"]) == \
        api(temperature=0.0, top_k=3, max_new_tokens=6)
    assert _cli_text(capsys, base + ["--generation-config", "none", "--max-new-tokens", "9"]
                     ) == api(max_new_tokens=9)


def test_bamba_chat_takes_the_files_defaults_under_its_flags(checkpoint):
    _save_generation_config(checkpoint, do_sample=True, max_new_tokens=6, top_p=0.5)
    defaults = read_generation_defaults(checkpoint)
    args = build_parser("chat").parse_args(["chat", str(checkpoint), "--temperature", "0.2"])
    params = chat_params(args, defaults)
    assert (params.max_tokens, params.top_p, params.temperature) == (6, 0.5, 0.2)
    assert chat_params(args).max_tokens == 256  # chat's own default without the file


def test_the_server_takes_the_files_defaults_under_a_request(checkpoint):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from bamba.serve.app import build_app
    from bamba.serve.async_engine import AsyncEngine
    from serve_helpers import running

    _save_generation_config(checkpoint, do_sample=True, max_new_tokens=5, temperature=0.0)
    reference = LLM(str(checkpoint), memory_gb=0.01, max_model_len=64)

    def expected(**values) -> list[int]:
        params = SamplingParams(ignore_eos=True, **values)
        return reference.generate(PROMPT, params)[0].outputs[0].token_ids

    engine = AsyncEngine(LLM(str(checkpoint), memory_gb=0.01, max_model_len=64)).start()
    try:
        with running(build_app(engine, "tiny")) as base:
            def completion(**body) -> tuple[str, int]:
                r = httpx.post(f"{base}/v1/completions", timeout=60, json={
                    "model": "tiny", "prompt": PROMPT, "ignore_eos": True, **body})
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["text"], r.json()["usage"]["completion_tokens"]

            decode = reference.tokenizer.decode
            # the file's max_new_tokens (not the legacy API's 16) and its temperature 0
            assert completion() == (decode(expected(temperature=0.0, max_tokens=5)), 5)
            assert completion(max_tokens=3)[1] == 3
            assert completion(temperature=1.0, seed=4)[0] == \
                decode(expected(temperature=1.0, seed=4, max_tokens=5))
    finally:
        engine.shutdown()


def test_saving_keeps_the_defaults_and_transformers_reads_them_back(checkpoint, tmp_path):
    from transformers import GenerationConfig as HFGenerationConfig

    _save_generation_config(checkpoint, do_sample=True, max_new_tokens=12,
                            eos_token_id=[2, 7], **SAMPLING)
    model = from_pretrained(checkpoint)
    save_pretrained(model, tmp_path / "copy")
    assert from_pretrained(tmp_path / "copy").generation_defaults == model.generation_defaults
    theirs = HFGenerationConfig.from_pretrained(tmp_path / "copy")
    assert (theirs.temperature, theirs.top_k, theirs.max_new_tokens, theirs.eos_token_id) == \
        (0.7, 5, 12, [2, 7])


def test_a_gguf_file_carries_the_defaults_in_llama_cpp_keys(checkpoint, tmp_path):
    gguf = pytest.importorskip("gguf")
    _save_generation_config(checkpoint, do_sample=True, eos_token_id=[2, 7], **SAMPLING)
    out = tmp_path / "model.gguf"
    assert main(["export-gguf", str(checkpoint), str(out)]) == 0
    reader = gguf.GGUFReader(out)
    assert reader.get_field("general.sampling.top_k").contents() == 5
    assert reader.get_field("general.sampling.temp").contents() == pytest.approx(0.7)
    assert reader.get_field("tokenizer.ggml.eot_token_id").contents() == 7
    defaults = from_pretrained(out).generation_defaults
    assert defaults.eos_token_ids == (7,)
    assert defaults.sampling == pytest.approx({k: v for k, v in SAMPLING.items()
                                               if k != "repetition_penalty"})


@pytest.mark.parametrize("fields, named", [
    ({"temperature": -1}, "temperature"), ({"temperature": True}, "temperature"),
    ({"top_k": 1.5}, "top_k"), ({"top_p": 0}, "top_p"), ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"eos_token_id": "</s>"}, "eos_token_id"), ({"eos_token_id": [2, -1]}, "eos_token_id"),
])
def test_a_bad_value_is_one_line_naming_the_file_and_field(checkpoint, capsys, fields, named):
    path = checkpoint / GENERATION_CONFIG_NAME
    path.write_text(json.dumps(fields))
    with pytest.raises(ValueError, match=f"{GENERATION_CONFIG_NAME}: {named} must be"):
        from_pretrained(checkpoint)
    assert main(["generate", "--model", str(checkpoint), "--prompt", "abc"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and GENERATION_CONFIG_NAME in err and named in err


@pytest.mark.parametrize("raw, says", [(b"[1, 2]", "expected a JSON object"),
                                        (b"{", "not valid JSON"), (b"\xff{}", "not UTF-8")])
def test_a_file_that_is_no_json_object_is_one_line(checkpoint, raw, says):
    (checkpoint / GENERATION_CONFIG_NAME).write_bytes(raw)
    with pytest.raises(ValueError, match=says):
        from_pretrained(checkpoint)
    with pytest.raises(FileNotFoundError, match="no such file"):
        LLM(str(checkpoint), generation_config=str(checkpoint / "missing.json"))
