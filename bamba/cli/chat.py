"""``bamba chat CHECKPOINT``: a conversation in the terminal, one line a turn, replies streamed.

Each turn renders the whole conversation with the tokenizer's chat template (the server's
``render_chat``, with its default template) and runs it through the serving engine with prefix
caching: the earlier turns' KV blocks and Mamba state snapshots stay cached, so a turn computes
only the tokens after the last cached block instead of the whole history again.
Reads stdin line by line whether or not it is a terminal, so it can be driven by a pipe.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

from bamba.cli.inference_options import (add_model_options, add_sampling_options,
                                         add_speculative_option, checkpoint_tokenizer,
                                         rope_scaling_option, sampling_values, set_threads,
                                         speculative_option)

log = logging.getLogger(__name__)

COMMANDS = {"/reset": "forget the conversation (the system prompt stays)",
            "/exit": "leave (Ctrl-D too)", "/help": "this list"}
HELP = "\n".join([*(f"  {name:7} {text}" for name, text in COMMANDS.items()),
                  "  Ctrl-C stops the reply being written"])


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("while chatting: /reset forgets the conversation, /exit (or Ctrl-D) leaves, "
                     "/help lists these; Ctrl-C stops the reply being written")
    parser.add_argument("model", metavar="CHECKPOINT", help="checkpoint directory, hub id or GGUF file")
    parser.add_argument("--system", default=None, metavar="TEXT",
                        help="system prompt: the first message of every conversation")
    add_sampling_options(parser, max_new_tokens=256, temperature=0.7)
    add_model_options(parser)
    add_speculative_option(parser)
    parser.add_argument("--memory-gb", type=float, default=1.0,
                        help="GB (10^9 bytes) for the KV blocks and state slots of the "
                             "conversation and its cached earlier turns")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch threads (default: one per core, fewer on busy cores)")


class ChatSession:
    """A conversation over an engine: ``reply`` streams the assistant's answer to one user
    message and adds both to ``messages``; ``reset`` starts again (keeping the system prompt).
    ``last_prompt`` and ``last_cached_tokens`` tell what the latest turn ran."""

    def __init__(self, llm: Any, params: Any, system: str | None = None):
        self.llm, self.params, self.system = llm, params, system
        self.messages: list[dict[str, str]] = []
        self.last_prompt: str | None = None
        self.last_cached_tokens = 0
        self.last_finish_reason: str | None = None
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, text: str, interrupted: Callable[[], bool] = lambda: False) -> Iterator[str]:
        """Stream the reply to ``text``. It ends at EOS, a stop string, --max-new-tokens, or
        when ``interrupted()`` turns true (checked between engine steps); whatever was written
        joins the history. ValueError (history unchanged) when the conversation no longer fits
        the context."""
        from bamba.serve.chat import render_chat

        messages = [*self.messages, {"role": "user", "content": text}]
        prompt = render_chat(self.llm.tokenizer, messages)
        prefix = self.llm.prefix
        hits_before = prefix.hit_tokens if prefix is not None else 0
        request_id = self.llm.add_request(prompt, self.params)
        self.last_prompt, self.last_finish_reason = prompt, None
        pieces: list[str] = []
        try:
            while self.last_finish_reason is None and not interrupted():
                outputs = self.llm.step()
                if not outputs and not self.llm.scheduler.has_work():
                    raise RuntimeError("engine idle with an unfinished reply")
                for output in outputs:
                    completion = output.outputs[0]
                    self.last_finish_reason = completion.finish_reason
                    if completion.new_text:
                        pieces.append(completion.new_text)
                        yield completion.new_text
        finally:
            if self.last_finish_reason is None:
                self.llm.abort(request_id)
                self.last_finish_reason = "abort"
            self.last_cached_tokens = (prefix.hit_tokens if prefix is not None else 0) - hits_before
            log.debug("turn %d: %d cached prompt tokens, finish %s, prompt %r",
                      sum(m["role"] == "user" for m in messages), self.last_cached_tokens,
                      self.last_finish_reason, prompt)
            self.messages = [*messages, {"role": "assistant", "content": "".join(pieces)}]


@contextlib.contextmanager
def _ctrl_c_flag() -> Iterator[Callable[[], bool]]:
    """Within the block Ctrl-C sets a flag (read by the returned function) instead of raising,
    so a reply stops between engine steps and the conversation goes on."""
    pressed = [False]

    def handler(signum: int, frame: Any) -> None:
        pressed[0] = True

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: no signal handling
        yield lambda: pressed[0]
        return
    try:
        yield lambda: pressed[0]
    finally:
        signal.signal(signal.SIGINT, previous)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _turn(session: ChatSession, text: str) -> None:
    """One user message: the streamed reply on stdout, a note on stderr if it was cut short."""
    from bamba.native import steady_weights

    with _ctrl_c_flag() as interrupted, contextlib.closing(session.reply(text, interrupted)) \
            as pieces, steady_weights():  # printing the pieces replaces no weight
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    notes = {"length": "[reply cut at --max-new-tokens]", "abort": "[reply stopped]",
             "error": "[the engine failed on this reply; see the log]"}
    if session.last_finish_reason in notes:
        _say(notes[session.last_finish_reason])


def _read_line(interactive: bool) -> str | None:
    """The next input line without its newline; None at end of input (Ctrl-D)."""
    if interactive:
        try:
            return input("> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line.rstrip("\r\n") if line else None


def chat_loop(session: ChatSession, interactive: bool) -> None:
    """Read lines until /exit or end of input; commands start with a slash."""
    while (line := _read_line(interactive)) is not None:
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return
        if text == "/reset":
            session.reset()
            _say("[conversation cleared]")
        elif text == "/help":
            _say(HELP)
        elif text.startswith("/") and text.split()[0] in COMMANDS:
            _say(f"{text.split()[0]} takes no arguments")
        elif text.startswith("/") and " " not in text:
            _say(f"unknown command {text}; /help lists the commands")
        else:
            try:
                _turn(session, line)
            except ValueError as exc:
                _say(f"bamba chat: error: {exc} (/reset starts a new conversation)")


def run(args: argparse.Namespace) -> int:
    from bamba.dtypes import parse_dtype
    from bamba.engine import LLM

    dtype = parse_dtype(args.dtype, "--dtype")
    set_threads(args.threads)
    chat_params(args)  # bad values fail before the model loads
    rope_scaling = rope_scaling_option(args.rope_scaling)
    speculative = speculative_option(args.speculative_config)
    tokenizer = checkpoint_tokenizer(args.model, args.tokenizer)
    llm = LLM(args.model, tokenizer, dtype=dtype, memory_gb=args.memory_gb, max_num_seqs=1,
              enable_prefix_caching=True, rope_scaling=rope_scaling,
              generation_config=args.generation_config, speculative_config=speculative)
    params = chat_params(args, llm.generation_defaults)
    interactive = sys.stdin.isatty()
    if interactive:
        _say(f"chatting with {args.model} (context {llm.max_model_len} tokens); "
             f"/help lists the commands")
    chat_loop(ChatSession(llm, params, args.system), interactive)
    return 0


def chat_params(args: argparse.Namespace, defaults: Any = None) -> Any:
    """The replies' SamplingParams: the options given, else the checkpoint's generation
    defaults, else chat's own."""
    from bamba.engine import SamplingParams

    values = sampling_values(args, defaults)
    return SamplingParams(max_tokens=values.pop("max_new_tokens"), stop=args.stop, **values)
