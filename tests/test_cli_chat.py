"""``bamba chat`` driven through a pipe (stdin not a terminal): each turn renders the whole
conversation, /reset forgets it, replies equal ``bamba generate`` on the same rendered prompt,
earlier turns come from the prefix cache; and the options generate, chat and serve share."""

import io
import logging
import os
import signal

import pytest

from bamba.cli.chat import ChatSession, _ctrl_c_flag, chat_loop
from bamba.cli import build_parser, main
from bamba.default_model import byte_tokenizer
from bamba.engine import LLM, SamplingParams
from bamba.serve.chat import render_chat
from test_cli_generate import checkpoint_dir  # noqa: F401 (the tiny checkpoint fixture)

GREEDY = ["--temperature", "0", "--dtype", "float32", "--max-new-tokens", "10", "--threads", "1"]


def _chat(directory, lines, capsys, monkeypatch, caplog, *extra):
    """(stdout, stderr, rendered prompts) of ``bamba chat`` reading ``lines`` from a pipe."""
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="bamba.cli.chat"):
        assert main(["chat", str(directory), *GREEDY, *extra]) == 0
    out, err = capsys.readouterr()
    prompts = [r.args[-1] for r in caplog.records if r.name == "bamba.cli.chat"]
    return out, err, prompts


def _generated(directory, prompt, tmp_path, capsys):
    """What ``bamba generate`` prints for this prompt with the same greedy options."""
    path = tmp_path / "prompt.txt"
    path.write_text(prompt, encoding="utf-8")
    assert main(["generate", "--model", str(directory), "--prompt-file", str(path), *GREEDY]) == 0
    return capsys.readouterr().out


def test_turns_see_the_history_reset_forgets_it_and_replies_equal_generate(
        checkpoint_dir, tmp_path, capsys, monkeypatch, caplog):  # noqa: F811
    lines = ["hi there", "how are you", "/reset", "hello", "/exit", "never read"]
    out, err, prompts = _chat(checkpoint_dir, lines, capsys, monkeypatch, caplog)
    assert len(prompts) == 3 and "[conversation cleared]" in err
    tokenizer = byte_tokenizer()
    first = render_chat(tokenizer, [{"role": "user", "content": "hi there"}])
    assert prompts[0] == first
    assert prompts[1].startswith(first) and prompts[1].endswith("<|user|>\nhow are you\n"
                                                                "<|assistant|>\n")
    reply = prompts[1][len(first):-len("\n<|user|>\nhow are you\n<|assistant|>\n")]
    assert prompts[2] == render_chat(tokenizer, [{"role": "user", "content": "hello"}])
    expected = [_generated(checkpoint_dir, p, tmp_path, capsys) for p in prompts]
    assert out == "".join(expected)
    assert expected[0] == reply + "\n"  # the history holds the reply as it was printed
    assert "never read" not in "".join(prompts)


def test_system_prompt_survives_reset_and_end_of_input_exits(
        checkpoint_dir, capsys, monkeypatch, caplog):  # noqa: F811
    out, err, prompts = _chat(checkpoint_dir, ["a", "/reset", "b"], capsys, monkeypatch, caplog,
                              "--system", "be brief")
    assert all(p.startswith("<|system|>\nbe brief\n<|user|>\n") for p in prompts)
    assert prompts[1].endswith("<|user|>\nb\n<|assistant|>\n") and "\na\n" not in prompts[1]


def test_commands_and_errors_keep_the_conversation_going(
        checkpoint_dir, capsys, monkeypatch, caplog):  # noqa: F811
    lines = ["/help", "/nope", "/reset now", "", "x" * 5000, "ok"]
    out, err, prompts = _chat(checkpoint_dir, lines, capsys, monkeypatch, caplog,
                              "--memory-gb", "0.0003")
    assert "/reset" in err and "/exit" in err and "Ctrl-C" in err  # /help
    assert "unknown command /nope" in err and "/reset takes no arguments" in err
    assert "bamba chat: error:" in err and "must leave room for one generated token" in err
    assert len(prompts) == 1 and prompts[0].endswith("<|user|>\nok\n<|assistant|>\n")
    assert "xxx" not in prompts[0]  # the refused turn did not join the history


def _session(directory, **params) -> ChatSession:
    llm = LLM(str(directory), byte_tokenizer(), dtype="float32", memory_gb=0.01, max_num_seqs=1)
    return ChatSession(llm, SamplingParams(temperature=0, max_tokens=8, **params))


def test_later_turns_reuse_the_cached_earlier_turns(checkpoint_dir):  # noqa: F811
    session = _session(checkpoint_dir)
    "".join(session.reply("tell me about the weather today"))
    assert session.last_cached_tokens == 0
    second = "".join(session.reply("and tomorrow?"))
    assert session.last_cached_tokens >= 32  # turn 1's prompt blocks (16 tokens each)
    fresh = _session(checkpoint_dir)
    fresh.messages = session.messages[:2]
    assert "".join(fresh.reply("and tomorrow?")) == second  # cached == recomputed


def test_an_interrupted_reply_stops_alone(checkpoint_dir):  # noqa: F811
    session = _session(checkpoint_dir, ignore_eos=True)
    pieces = []
    for piece in session.reply("hello", interrupted=lambda: len(pieces) >= 2):
        pieces.append(piece)
    assert session.last_finish_reason == "abort" and len(pieces) == 2
    assert session.messages[-1] == {"role": "assistant", "content": "".join(pieces)}
    assert not session.llm.has_unfinished_requests()
    assert session.llm.stats().num_running == 0
    assert "".join(session.reply("again")) and session.last_finish_reason == "length"


def test_ctrl_c_during_a_reply_sets_a_flag_instead_of_raising():
    before = signal.getsignal(signal.SIGINT)
    with _ctrl_c_flag() as interrupted:
        assert not interrupted()
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupted()
    assert signal.getsignal(signal.SIGINT) is before


def test_stop_strings_end_a_reply(checkpoint_dir):  # noqa: F811
    full = "".join(_session(checkpoint_dir, ignore_eos=True).reply("hi"))
    cut = next(i for i in range(2, len(full)) if full[i] != "\ufffd")
    session = _session(checkpoint_dir, ignore_eos=True, stop=[full[cut]])
    assert "".join(session.reply("hi")) == full[:full.find(full[cut])]
    assert session.last_finish_reason == "stop"


def test_loop_reads_until_exit(checkpoint_dir, monkeypatch, capsys):  # noqa: F811
    session = _session(checkpoint_dir)
    monkeypatch.setattr("sys.stdin", io.StringIO("one\n/exit\ntwo\n"))
    chat_loop(session, interactive=False)
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["one"]


# ---- options the inference verbs share -----------------------------------------------------
VERBS = {"generate": ["--prompt", "x"], "chat": ["CKPT"], "serve": ["CKPT"]}


@pytest.mark.parametrize("verb", VERBS)
def test_same_dtype_default_and_options_have_help(verb):
    parser = build_parser(verb)
    args = parser.parse_args([verb, *VERBS[verb]])
    assert args.dtype == "bfloat16" and args.tokenizer is None
    verb_parser = parser._subparsers._group_actions[0].choices[verb]
    for action in verb_parser._actions:
        if verb != "serve" or action.dest in ("dtype", "tokenizer"):
            assert action.help, f"{verb} {action.option_strings or action.dest} has no help"


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize("dtype", ["fp16", "float16", "int8"])
def test_float16_is_refused_by_every_verb(verb, dtype, checkpoint_dir, capsys):  # noqa: F811
    argv = [verb, *VERBS[verb]]
    argv = [str(checkpoint_dir) if a == "CKPT" else a for a in argv]
    if verb == "generate":
        argv += ["--model", str(checkpoint_dir)]
    assert main([*argv, "--dtype", dtype]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"bamba {verb}: error: --dtype {dtype!r} is not one of " \
                  f"float32, fp32, bfloat16, bf16"


@pytest.mark.parametrize("verb", VERBS)
def test_checkpoint_without_tokenizer_names_the_override(verb, checkpoint_dir, tmp_path,  # noqa: F811
                                                        monkeypatch, capsys):
    (checkpoint_dir / "tokenizer.json").unlink()
    argv = [str(checkpoint_dir) if a == "CKPT" else a for a in VERBS[verb]]
    if verb == "generate":
        argv += ["--model", str(checkpoint_dir)]
    assert main([verb, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pass --tokenizer DIR_OR_ID" in err
    if verb == "chat":  # with the override, the chat runs
        byte_tokenizer().save(tmp_path / "tok")
        monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
        assert main(["chat", *argv, "--tokenizer", str(tmp_path / "tok"), *GREEDY]) == 0
        assert capsys.readouterr().out.endswith("\n")
