"""``bamba serve DIR_OR_ID``: an OpenAI-compatible HTTP server, on 127.0.0.1 by default.

Routes: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics. Chat prompts use
the tokenizer's chat template; without one, each message renders as ``<|role|>\\ncontent\\n``
and the prompt ends with ``<|assistant|>\\n`` (``bamba.serve.chat.DEFAULT_CHAT_TEMPLATE``).
With ``--api-key`` (or $BAMBA_API_KEY) every /v1/ route needs ``Authorization: Bearer KEY``.
The address is bound before the model loads, so a busy port fails at once.
"""

from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger(__name__)


def _mixed_step_tokens(text: str) -> int | str | None:
    """--mixed-step-tokens: "auto", 0 (no limit) or a count of at least 2."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a whole number, got {text!r}")
    if value == 0:
        return None
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected auto, 0 or at least 2, got {value}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="DIR_OR_ID",
                        help="checkpoint directory, hub id or GGUF file")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    parser.add_argument("--served-model-name", default=None,
                        help="the model id clients send (default: the path's last part)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' (default: $BAMBA_API_KEY)")
    from bamba.cli.inference_options import (add_generation_config_option, add_model_options,
                                             add_speculative_option)
    from bamba.serve.tools import PARSERS

    add_model_options(parser)
    parser.add_argument("--state-dtype", default="float32",
                        help="Mamba state slots: float32 (default) or bfloat16")
    parser.add_argument("--memory-gb", type=float, default=2.0,
                        help="GB (10^9 bytes) for KV blocks and state slots together")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument("--max-num-seqs", type=int, default=64,
                        help="sequences decoded together at most")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048,
                        help="tokens (prefill chunks + decodes) per engine step")
    parser.add_argument("--mixed-step-tokens", type=_mixed_step_tokens, default="auto",
                        help="while sequences decode, a step holds at most this many tokens: "
                             "a newcomer's prompt runs beside their tokens over several steps "
                             "(auto: 16 where the native step runs; 0: no such limit)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="context length (default: the model's)")
    parser.add_argument("--no-prefix-caching", action="store_true",
                        help="do not reuse KV blocks and Mamba states of shared prompt prefixes")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: one per core, fewer on busy cores)")
    add_generation_config_option(parser)
    add_speculative_option(parser)
    parser.add_argument("--tool-call-parser", default=None, choices=PARSERS,
                        help="read the tool calls of replies to tool_choice \"auto\" in this "
                             "format (hermes: <tool_call>{...}</tool_call>, as Granite 4.0, "
                             "Qwen and Hermes templates write them; granite: Granite 3.x's "
                             "<|tool_call|>[...]; llama3_json: Llama 3.x's JSON calls); "
                             "without it \"auto\" is refused and \"required\" or a named "
                             "function still work")
    from bamba.compile import MODES

    parser.add_argument("--compile", default="none", choices=("none", *MODES),
                        help="compile decode steps with inductor (the first one takes about "
                             "100 s; then faster batched decode)")
    parser.add_argument("--max-request-bytes", type=int, default=8 * 2**20,
                        help="larger request bodies are refused with 413")
    parser.add_argument("--max-connections", type=int, default=512,
                        help="connections (and requests) served at once; beyond, 503")
    parser.add_argument("--head-timeout", type=float, default=10.0,
                        help="seconds a connection has to send a request's headers")
    parser.add_argument("--keep-alive-timeout", type=float, default=5.0,
                        help="seconds an idle keep-alive connection stays open")
    parser.add_argument("--http", default="auto", choices=("auto", "httptools", "h11"),
                        help="HTTP implementation (auto: httptools when installed, else h11)")
    parser.add_argument("--loop", default="auto", choices=("auto", "uvloop", "asyncio"),
                        help="event loop (auto: uvloop when installed, else asyncio)")
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"],
                        help="log level of the server and its HTTP layer")


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from bamba.serve.app import build_app
        from bamba.serve.async_engine import AsyncEngine
        from bamba.serve.http import (bind, event_loop, http_protocol, limit_log_rate,
                                       uvicorn_config)
    except ImportError as exc:
        raise ValueError(f"bamba serve needs the serve extra (pip install 'bamba[serve]'): "
                         f"{exc}") from None
    from bamba.cli.inference_options import (checkpoint_tokenizer, rope_scaling_option,
                                             set_threads, speculative_option)
    from bamba.cores import in_passing_thread
    from bamba.dtypes import parse_dtype
    from bamba.engine import LLM

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    set_threads(args.threads)
    for option, value in (("--max-request-bytes", args.max_request_bytes),
                          ("--max-connections", args.max_connections),
                          ("--head-timeout", args.head_timeout),
                          ("--keep-alive-timeout", args.keep_alive_timeout)):
        if not value > 0:
            raise ValueError(f"{option} must be positive, got {value}")
    http, loop = http_protocol(args.http), event_loop(args.loop)
    dtype = parse_dtype(args.dtype, "--dtype")
    rope_scaling = rope_scaling_option(args.rope_scaling)
    speculative = speculative_option(args.speculative_config)
    sock = bind(args.host, args.port)  # a busy port fails now, not after the model loads
    try:
        tokenizer = checkpoint_tokenizer(args.model, args.tokenizer)  # before the weights load
        # loaded on a passing thread: the engine's thread then owns the only OpenMP pool
        def load() -> LLM:
            return LLM(args.model, tokenizer, dtype=dtype, state_dtype=args.state_dtype,
                       memory_gb=args.memory_gb, block_size=args.block_size,
                       max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens,
                       max_model_len=args.max_model_len,
                       enable_prefix_caching=not args.no_prefix_caching,
                       compile_mode=None if args.compile == "none" else args.compile,
                       rope_scaling=rope_scaling, mixed_step_tokens=args.mixed_step_tokens,
                       generation_config=args.generation_config,
                       speculative_config=speculative)

        llm = in_passing_thread(load)
        name = args.served_model_name or os.path.basename(os.path.normpath(str(args.model)))
        api_key = args.api_key or os.environ.get("BAMBA_API_KEY") or None
        engine = AsyncEngine(llm).start()
        try:
            app = build_app(engine, name, api_key, args.max_request_bytes,
                            args.tool_call_parser)
            config = uvicorn_config(app, head_timeout=args.head_timeout,
                                    keep_alive_timeout=args.keep_alive_timeout,
                                    max_connections=args.max_connections, http=http,
                                    loop=loop, log_level=args.log_level,
                                    timeout_graceful_shutdown=5)
            limit_log_rate()
            log.info("serving %r on http://%s:%d (API key %s; HTTP %s, %s loop)", name,
                     args.host, args.port, "required" if api_key else "off", http, loop)
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            engine.shutdown()
    finally:
        sock.close()
    return 0
