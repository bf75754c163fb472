"""``bamba quantize``: a checkpoint's linear layers to fp8, int8 or int4 (compressed-tensors)."""

from __future__ import annotations

import argparse

SCHEMES = ("fp8", "int8", "int4")
DEFAULT_INT4_GROUP = 128


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SRC", help="dense checkpoint directory or hub id")
    parser.add_argument("target", metavar="DST", help="directory to write the quantized checkpoint to")
    parser.add_argument("--scheme", required=True, choices=SCHEMES,
                        help="weight format: fp8 (float8_e4m3fn, a scale per output channel), "
                             "int8 or int4 (symmetric unless --asymmetric, packed into int32 "
                             "words); activations "
                             "stay in the model's dtype")
    parser.add_argument("--asymmetric", action="store_true",
                        help="int8 / int4 with a zero point per scale (compressed-tensors "
                             "symmetric: false, as llm-compressor's W4A16_ASYM and AWQ write): "
                             "w = (q - zp) * scale over each group's own range; --scheme's "
                             "layers only")
    parser.add_argument("--group-size", type=int, default=None, metavar="N",
                        help="inputs sharing one scale (32, 64, 128, ...; int8/int4 only); "
                             f"default: {DEFAULT_INT4_GROUP} for int4, one scale per output "
                             "channel for int8 and fp8")
    parser.add_argument("--ignore", default=None, metavar="NAMES",
                        help="comma-separated linear layers to keep unquantized: checkpoint "
                             "module names or re:REGEX (empty quantizes every linear; a "
                             "Granite MoE's experts are the linears "
                             "block_sparse_moe.experts.<e>.gate_proj / up_proj / down_proj, "
                             "its routers are always kept); default: lm_head, unless "
                             "--lm-head gives it a scheme")
    parser.add_argument("--lm-head", default=None, choices=SCHEMES, metavar="SCHEME",
                        help="quantize the LM head in a scheme of its own (fp8, int8, or int4 "
                             "in groups of --group-size, default 128; the others a scale a "
                             "row), as llama.cpp's --output-tensor-type; default: kept dense")
    parser.add_argument("--embedding", default=None, choices=SCHEMES, metavar="SCHEME",
                        help="quantize the token embeddings too (schemes as --lm-head), as "
                             "llama.cpp's --token-embedding-type; default: kept dense. A head "
                             "tied to them reads them quantized (--lm-head unties it). Only "
                             "bamba reads quantized embeddings (transformers cannot load them)")
    parser.add_argument("--experts", default=None, choices=SCHEMES, metavar="SCHEME",
                        help="a Granite MoE's experts in a scheme of their own (schemes as "
                             "--lm-head), e.g. int4 experts beside int8 attention, Mamba and "
                             "shared MLP; default: the --scheme of the other linears")
    parser.add_argument("--max-shard-size", default="2GB", metavar="SIZE",
                        help="split the safetensors file above this size")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def group_size_for(scheme: str, group_size: int | None) -> int | None:
    """The group size a scheme gets: int4 defaults to 128; fp8 has one scale per channel."""
    if group_size is not None and group_size <= 0:
        raise ValueError(f"--group-size must be positive, got {group_size}")
    if scheme == "fp8":
        return None
    return DEFAULT_INT4_GROUP if scheme == "int4" and group_size is None else group_size


def run(args: argparse.Namespace) -> int:
    from bamba.quant.convert import quantize_checkpoint
    from bamba.quant.formats import make_scheme

    named = [n for n in (args.scheme, args.lm_head, args.embedding, args.experts) if n]
    if args.group_size is not None and all(n == "fp8" for n in named):
        raise ValueError("--group-size applies to int8 and int4; fp8 has one scale per "
                         "output channel")
    if args.asymmetric and args.scheme == "fp8":
        raise ValueError("--asymmetric applies to int8 and int4; fp8 is symmetric")
    scheme = make_scheme(args.scheme, group_size_for(args.scheme, args.group_size),
                         symmetric=not args.asymmetric)
    lm_head, embedding, experts = (None if name is None else make_scheme(
        name, group_size_for(name, args.group_size if name == "int4" else None))
        for name in (args.lm_head, args.embedding, args.experts))
    ignore = ignore_list(args.ignore, lm_head is not None)
    path = quantize_checkpoint(args.source, args.target, scheme, ignore,
                               max_shard_size=args.max_shard_size, progress=not args.no_progress,
                               lm_head=lm_head, embedding=embedding, experts=experts)
    extras = "".join(f", {what} {s.name}" for what, s in (("lm_head", lm_head),
                                                         ("embeddings", embedding),
                                                         ("experts", experts)) if s)
    print(f"wrote {path} ({scheme.name}{'' if scheme.symmetric else ' with zero points'}"
          f"{'' if scheme.group_size is None else f', group size {scheme.group_size}'}{extras})")
    return 0


def ignore_list(names: str | None, lm_head_quantized: bool) -> list[str]:
    """--ignore's entries (default: lm_head, unless --lm-head quantizes it, which an explicit
    --ignore naming lm_head contradicts)."""
    if names is None:
        return [] if lm_head_quantized else ["lm_head"]
    ignore = [name.strip() for name in names.split(",") if name.strip()]
    if lm_head_quantized and "lm_head" in ignore:
        raise ValueError("--lm-head quantizes the lm_head that --ignore keeps dense; drop one")
    return ignore
