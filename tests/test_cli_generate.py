"""``bamba generate`` end to end through ``bamba.cli.main``: the streamed text is the decoded
greedy continuation of the Python API (and of the engine, penalties and stop strings included),
speeds go to stderr, user errors are one line."""

import io

import pytest
import torch

from bamba.checkpoint import from_pretrained, save_pretrained
from bamba.cli import main
from bamba.config import preset
from bamba.default_model import byte_tokenizer, load_default
from bamba.engine import LLM, SamplingParams
from bamba.generation import GenerationConfig, generate
from bamba.model import BambaLM, init_weights


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _api_greedy(model, tokenizer, prompt, max_new_tokens):
    """(decoded text, decode steps) of the Python API's greedy continuation."""
    eos = sorted(set(model.config.eos_token_ids) | set(tokenizer.eos_token_ids))
    result = generate(model, [tokenizer.encode(prompt)],
                      GenerationConfig(max_new_tokens=max_new_tokens, eos_token_ids=eos))[0]
    return tokenizer.decode(result.token_ids), result.decode_steps


def _one_line_error(capsys, *fragments):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("bamba generate: error:")
    for fragment in fragments:
        assert fragment in err


def test_default_model_streams_greedy_text_and_says_it_is_untrained(capsys, caplog):
    with caplog.at_level("WARNING", logger="bamba.default_model"):
        assert main(["generate", "--prompt", "Hello, Bamba", "--max-new-tokens", "8",
                     "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    assert caplog.text.count("UNTRAINED") == 1 and "noise" in caplog.text  # said once
    assert "UNTRAINED" not in err
    text, steps = _api_greedy(*load_default(torch.bfloat16), "Hello, Bamba", 8)
    assert out == text + "\n"
    assert "bfloat16" in err  # the default dtype, as serve's and chat's
    assert "prefill: 12 tokens" in err and f"decode: {steps} tokens" in err and "tok/s" in err
    assert torch.get_num_threads() == 1


def test_default_model_in_bfloat16_with_sampling(capsys):
    argv = ["generate", "--prompt", "abc", "--max-new-tokens", "5", "--dtype", "bfloat16",
            "--threads", "1", "--temperature", "0.9", "--top-k", "50", "--top-p", "0.95",
            "--seed", "7"]
    assert main(argv) == 0
    first = capsys.readouterr()
    assert "bfloat16" in first.err and "prefill: 3 tokens" in first.err
    assert main(argv) == 0
    assert capsys.readouterr().out == first.out  # seeded


@pytest.fixture
def checkpoint_dir(tmp_path):
    config = preset("tiny", vocab_size=257, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=4, attn_layer_indices=[1], num_attention_heads=4,
                    mamba_n_heads=2, mamba_d_state=16, bos_token_id=None, eos_token_id=256,
                    pad_token_id=None, initializer_range=0.2)
    model = init_weights(BambaLM(config), seed=1)
    return save_pretrained(model, tmp_path / "ckpt", tokenizer=byte_tokenizer())


def test_saved_checkpoint_runs(checkpoint_dir, capsys):
    assert main(["generate", "--model", str(checkpoint_dir), "--prompt", "The cat",
                 "--max-new-tokens", "10", "--threads", "1", "--dtype", "fp32"]) == 0
    out, err = capsys.readouterr()
    model = from_pretrained(checkpoint_dir)
    assert out == _api_greedy(model, byte_tokenizer(), "The cat", 10)[0] + "\n"
    assert "prefill: 7 tokens" in err and "UNTRAINED" not in err


def test_checkpoint_without_tokenizer_is_one_line(checkpoint_dir, capsys):
    (checkpoint_dir / "tokenizer.json").unlink()
    assert main(["generate", "--model", str(checkpoint_dir), "--prompt", "x"]) == 2
    _one_line_error(capsys, "tokenizer", "pass --tokenizer")


def test_tokenizer_override(checkpoint_dir, tmp_path, capsys):
    argv = ["generate", "--model", str(checkpoint_dir), "--prompt", "The cat",
            "--max-new-tokens", "6", "--dtype", "float32"]
    assert main(argv) == 0
    want = capsys.readouterr().out
    byte_tokenizer().save(tmp_path / "tok")
    (checkpoint_dir / "tokenizer.json").unlink()
    assert main([*argv, "--tokenizer", str(tmp_path / "tok")]) == 0
    assert capsys.readouterr().out == want


def _generate(checkpoint_dir, capsys, *extra):
    """(stdout, stderr) of a float32 greedy ``bamba generate`` of 24 tokens after "The cat"."""
    assert main(["generate", "--model", str(checkpoint_dir), "--max-new-tokens", "24",
                 "--dtype", "float32", "--threads", "1", *extra]) == 0
    return capsys.readouterr()


def _engine_text(checkpoint_dir, prompt, **params):
    llm = LLM(str(checkpoint_dir), dtype="float32", memory_gb=0.01)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, **params))
    return out[0].outputs[0]


def test_penalties_equal_the_engine(checkpoint_dir, capsys):
    penalties = dict(repetition_penalty=1.5, presence_penalty=0.8, frequency_penalty=0.6)
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in penalties.items()]
    out = _generate(checkpoint_dir, capsys, "--prompt", "The cat", *flags).out
    plain = _generate(checkpoint_dir, capsys, "--prompt", "The cat").out
    assert out != plain  # the penalties change this greedy continuation
    assert out == _engine_text(checkpoint_dir, "The cat", **penalties).text + "\n"


def test_min_p_keeps_greedy_and_sampling_seeded(checkpoint_dir, capsys):
    sampled = ["--prompt", "The cat", "--temperature", "1", "--min-p", "0.2", "--seed", "3"]
    first = _generate(checkpoint_dir, capsys, *sampled).out
    assert _generate(checkpoint_dir, capsys, *sampled).out == first


def test_stop_strings_end_the_output_and_are_not_printed(checkpoint_dir, capsys):
    full = _generate(checkpoint_dir, capsys, "--prompt", "The cat").out[:-1]
    pairs = [full[i:i + 2] for i in range(3, len(full) - 1) if "\ufffd" not in full[i:i + 2]]
    stop, other = pairs[0], pairs[-1]  # the earlier one wins, whatever the order given
    want = full[:full.find(stop)]
    out, err = _generate(checkpoint_dir, capsys, "--prompt", "The cat", "--stop", other,
                         "--stop", stop)
    assert out == want + "\n"
    assert "finish: stop" in err
    assert _engine_text(checkpoint_dir, "The cat", stop=[other, stop]).text == want


def test_prompt_from_stdin_or_file(checkpoint_dir, tmp_path, monkeypatch, capsys):
    want = _generate(checkpoint_dir, capsys, "--prompt", "The cat\nsat").out
    monkeypatch.setattr("sys.stdin", io.StringIO("The cat\nsat"))
    assert _generate(checkpoint_dir, capsys, "--prompt", "-").out == want
    (tmp_path / "p.txt").write_text("The cat\nsat", encoding="utf-8")
    assert _generate(checkpoint_dir, capsys, "--prompt-file", str(tmp_path / "p.txt")).out == want


def test_missing_model_dir_is_one_line(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    _one_line_error(capsys, "nope", "no such checkpoint directory")


@pytest.mark.parametrize("extra,fragment", [
    (["--dtype", "float16"], "--dtype"), (["--dtype", "fp16"], "--dtype 'fp16'"),
    (["--threads", "0"], "--threads"), (["--max-new-tokens", "0"], "max_new_tokens"),
    (["--top-p", "1.5"], "top_p"), (["--max-new-tokens", "9000"], "context of 8192"),
    (["--compile", "fast"], "compile mode 'fast'"), (["--min-p", "2"], "min_p"),
    (["--repetition-penalty", "0"], "repetition_penalty"),
    (["--presence-penalty", "3"], "presence_penalty"),
    (["--frequency-penalty", "nan"], "frequency_penalty"), (["--stop", ""], "--stop"),
    (["--prompt-file", "p.txt"], "not both"),
])
def test_bad_arguments_are_one_line(extra, fragment, capsys):
    assert main(["generate", "--prompt", "hi", *extra]) == 2
    _one_line_error(capsys, fragment)


@pytest.mark.parametrize("argv,fragment", [
    ([], "no prompt"), (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "-"], "the prompt from stdin is empty"),
    (["--prompt-file", "missing.txt"], "missing.txt"),
    (["--prompt-file", "."], "is a directory"),
])
def test_bad_prompt_sources_are_one_line(argv, fragment, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["generate", *argv]) == 2
    _one_line_error(capsys, fragment)


def test_embedded_default_is_deterministic_and_warns(caplog):
    with caplog.at_level("WARNING", logger="bamba.default_model"):
        model, tokenizer = load_default()
    assert "UNTRAINED" in caplog.text
    again, _ = load_default()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  again.state_dict().values(), strict=True))
    assert model.config.vocab_size == tokenizer.vocab_size == 257
    assert model.config.eos_token_ids == [tokenizer.eos_token_id] == [256]
    bf16, _ = load_default(torch.bfloat16)
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    assert bf16.model.layers[0].mamba.A_log.dtype == torch.float32


def test_byte_tokenizer_round_trips_any_text():
    tokenizer = byte_tokenizer()
    text = "naïve café — 🙂\n\t<b>x</b>  "
    ids = tokenizer.encode(text)
    assert ids == list(text.encode("utf-8"))  # token i is byte i, no BOS
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode("a<|endoftext|>") == [97, 256]
    assert tokenizer.decode([97, 256]) == "a"


def test_penalties_per_row_in_a_batch_equal_each_prompt_alone(checkpoint_dir):
    model, tokenizer = from_pretrained(checkpoint_dir), byte_tokenizer()
    prompts = [tokenizer.encode(p) for p in ("The cat sat", "ab", "a longer prompt here")]
    config = GenerationConfig(max_new_tokens=12, repetition_penalty=1.4, frequency_penalty=0.5,
                              eos_token_ids=[])
    together = [r.token_ids for r in generate(model, prompts, config)]
    assert together == [generate(model, [p], config)[0].token_ids for p in prompts]
    llm = LLM(model, tokenizer, memory_gb=0.01)
    params = SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.4,
                            frequency_penalty=0.5, ignore_eos=True)
    assert together == [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
