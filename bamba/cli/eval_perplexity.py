"""``bamba eval perplexity``: token-weighted loss and perplexity of documents, overall and by
position bucket (how the loss changes along long documents), with an optional sliding window."""

from __future__ import annotations

import argparse
import sys

from bamba.cli.eval import (add_model_arguments, check_context,
                            checkpoint_config, load_model, load_tokenizer, parse_rope_scaling,
                            prepare, short_name, write_results)
from bamba.eval.documents import FORMATS

DEFAULT_CONTEXT = 4096


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("files", nargs="+", metavar="FILES",
                        help="text files (one document each), .jsonl files (one a line) or "
                             "`bamba tokenize` output directories, as --format says")
    parser.add_argument("--format", default="text", choices=FORMATS, help="what FILES hold")
    parser.add_argument("--text-key", default="text", metavar="KEY",
                        help="the field of a JSONL line that holds its text")
    parser.add_argument("--context", type=int, default=None, metavar="TOKENS",
                        help="tokens the model sees at once, a window (default: 4096, or the "
                             "model's context if shorter)")
    parser.add_argument("--stride", type=int, default=None, metavar="TOKENS",
                        help="start a window every this many tokens; below --context the windows "
                             "overlap and every token after a document's first is scored once "
                             "with up to --context - 1 tokens of history (default: --context, "
                             "windows side by side)")
    parser.add_argument("--buckets", type=int, default=8, metavar="N",
                        help="equal ranges of document positions to report the loss for")
    parser.add_argument("--batch-size", type=int, default=4, metavar="N",
                        help="windows per forward pass")
    parser.add_argument("--max-documents", type=int, default=None, metavar="N",
                        help="score only the first N documents (default: all)")
    parser.add_argument("--rope-scaling", default=None, metavar="JSON",
                        help="a RoPE scaling over the checkpoint's, e.g. "
                             "'{\"rope_type\": \"yarn\", \"factor\": 4}'")


def run(args: argparse.Namespace) -> int:
    import torch

    from bamba.eval.documents import load_documents
    from bamba.eval.perplexity import check_options, perplexity
    from bamba.eval.plots import line_plot
    from bamba.native import accelerate

    scaling = parse_rope_scaling(args.rope_scaling) if args.rope_scaling is not None else None
    prepare(args)
    config = checkpoint_config(args.model)
    context = min(DEFAULT_CONTEXT, config.context_length) if args.context is None \
        else args.context
    stride = check_options(context, args.stride, args.buckets, args.batch_size)
    if scaling is None:
        check_context(context, config.context_length, f"--context {context}", False)
    encode = None if args.format == "shards" else load_tokenizer(args).encode
    documents = load_documents(args.files, args.format, encode, config.vocab_size,
                               args.text_key, args.max_documents)
    model = load_model(args, scaling)
    check_context(context, model.config.context_length, f"--context {context}", True)
    with torch.inference_mode():
        summary = perplexity(accelerate(model), documents, context, stride, args.buckets,
                             args.batch_size)
    result = {"task": "perplexity", "model": args.model, "dtype": args.dtype,
              "format": args.format, "files": args.files, **summary}
    path = write_results(args.out, "perplexity", result)
    buckets = summary["buckets"]
    line_plot(path.with_suffix(".png"),
              [("mean loss", [(b["start"] + b["end"] - 1) / 2 for b in buckets],
                [b["nll"] for b in buckets])],
              xlabel="position in the document (tokens)", ylabel="mean loss (nats per token)",
              title=f"{short_name(args.model)}: perplexity {summary['perplexity']:.3f} "
                    f"(context {summary['context']}, stride {summary['stride']})")
    print(f"{summary['tokens']} tokens of {summary['documents']} documents: "
          f"loss {summary['nll']:.4f}, perplexity {summary['perplexity']:.3f}")
    for b in buckets:
        loss = "-" if b["nll"] is None else f"{b['nll']:.4f}"
        print(f"  positions {b['start']}-{b['end'] - 1}: {b['tokens']} tokens, loss {loss}")
    print(f"wrote {path} and {path.with_suffix('.png').name}", file=sys.stderr)
    return 0
