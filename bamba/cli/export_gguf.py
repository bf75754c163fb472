"""``bamba export-gguf DIR OUT.gguf``: a checkpoint as one GGUF file for llama.cpp."""

from __future__ import annotations

import argparse
import logging

from bamba.gguf.export import FILE_TYPES

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory or hub id (with its "
                                           "tokenizer); a quantized one is dequantized first")
    parser.add_argument("out", help="GGUF file to write (replaced atomically)")
    parser.add_argument("--dtype", choices=FILE_TYPES, default="bf16",
                        help="tensor type of the weight matrices; norms, the conv and the SSM "
                             "scalars stay f32 as llama.cpp keeps them")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory or hub id when the checkpoint has none")


def run(args: argparse.Namespace) -> int:
    import torch

    from bamba.checkpoint import from_pretrained, load_tokenizer, tensor_reader
    from bamba.gguf.export import export_gguf

    tokenizer = load_tokenizer(args.tokenizer or args.checkpoint)
    dense = tensor_reader(args.checkpoint)  # a dense checkpoint: read a tensor at a time
    stored = None
    if dense is not None:
        model, tensor = dense
    else:
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        model, tensor = from_pretrained(args.checkpoint, dtype=dtype), None
        if getattr(model, "quantization_config", None) is not None:  # GGUF types of its own
            from bamba.model import BambaLM
            from bamba.quant.apply import dense_tensor, stored_ints

            log.info("%s is quantized: its int4 weights go into Q4_0 or Q8_0 blocks as "
                     "stored, its int8 ones into Q8_0; others are dequantized one at a time, "
                     "then written as %s", args.checkpoint, args.dtype)
            quantized = model
            with torch.device("meta"):
                model = BambaLM(quantized.config)
            model.generation_defaults = quantized.generation_defaults
            tensor = lambda name: dense_tensor(quantized, name, dtype)  # noqa: E731
            stored = lambda name: stored_ints(quantized, name)  # noqa: E731
    path = export_gguf(model, tokenizer, args.out, args.dtype, tensor=tensor, stored=stored)
    print(f"wrote {path} ({args.dtype})")
    return 0
