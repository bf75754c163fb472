"""``bamba serve DIR_OR_ID``: an OpenAI-compatible HTTP server (127.0.0.1 by default).

Chat prompts use the tokenizer's chat template; without one, a default template renders each
message as ``<|role|>\\ncontent\\n`` and ends with ``<|assistant|>\\n``.
"""

from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint directory or hub id")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None,
                        help="the model id clients send (default: the path's last part)")
    parser.add_argument("--api-key", default=os.environ.get("BAMBA_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $BAMBA_API_KEY)")
    parser.add_argument("--dtype", default="bfloat16", help="float32 or bfloat16")
    parser.add_argument("--state-dtype", default="float32", help="Mamba state: float32 or bfloat16")
    parser.add_argument("--memory-gb", type=float, default=2.0,
                        help="bytes (10^9) for KV blocks and state slots together")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise ValueError("bamba serve needs the serve extra: pip install 'bamba[serve]'") from None
    import torch

    from bamba.engine import LLM
    from bamba.serve.app import build_app
    from bamba.serve.async_engine import AsyncEngine

    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(args.model, dtype=args.dtype, state_dtype=args.state_dtype,
              memory_gb=args.memory_gb, block_size=args.block_size,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=args.max_model_len, enable_prefix_caching=not args.no_prefix_caching)
    name = args.served_model_name or os.path.basename(os.path.normpath(str(args.model)))
    engine = AsyncEngine(llm).start()
    try:
        uvicorn.run(build_app(engine, name, args.api_key), host=args.host, port=args.port,
                    log_level="info")
    finally:
        engine.shutdown()
    return 0
