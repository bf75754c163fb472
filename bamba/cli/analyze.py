"""``bamba analyze CONFIG_OR_DIR``: FLOPs, bytes moved and predicted decode speed-up of a hybrid
over its all-attention twin, from ``bamba.analyze``'s exact model and the Bamba appendix's
simplified formulas, as a table or as JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bamba.analyze import Precision, report
from bamba.config import PRESETS, BambaConfig, preset

DEFAULT_BATCHES = (1, 8, 32, 128)
DEFAULT_SEQS = (1024, 4096, 16384, 65536)


def _count(text: str) -> int:
    """A positive token or batch count; "16K" means 16384."""
    scale = 1024 if text[-1:] in ("k", "K") else 1
    digits = text[:-1] if scale > 1 else text
    try:
        value = int(digits) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (e.g. 8, 4096, 16K)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG_OR_DIR",
                        help=f"preset ({', '.join(PRESETS)}), config.json, checkpoint directory "
                             "or GGUF file (its weights priced at --dtype)")
    parser.add_argument("--batch", type=_count, nargs="+", metavar="B",
                        help=f"batch sizes (default {' '.join(map(str, DEFAULT_BATCHES))})")
    parser.add_argument("--seq", type=_count, nargs="+", metavar="S",
                        help="context lengths, e.g. 4096 or 4K (default 1K 4K 16K 64K)")
    parser.add_argument("--dtype", default="bfloat16", help="weight dtype (default bfloat16)")
    parser.add_argument("--kv-dtype", default=None, help="KV-cache dtype (default: --dtype)")
    parser.add_argument("--state-dtype", default="float32",
                        help="Mamba conv+SSM state dtype (default float32)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def load_config(spec: str) -> BambaConfig:
    """A preset name, a config.json path, a directory holding config.json, or a GGUF file
    (its metadata's configuration)."""
    if spec in PRESETS:
        return preset(spec)
    path = Path(spec)
    if path.is_file():
        from bamba.gguf.reader import is_gguf, read_model_file

        if is_gguf(path):
            return read_model_file(path).config
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{spec}: directory has no config.json")
    elif not path.is_file():
        raise FileNotFoundError(
            f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing path")
    return BambaConfig.from_json_file(path)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    precision = Precision(weights=args.dtype, kv=args.kv_dtype or args.dtype,
                          state=args.state_dtype)
    data = report(config, list(args.batch or DEFAULT_BATCHES), list(args.seq or DEFAULT_SEQS),
                  precision, name=args.config)
    print(json.dumps(data, indent=2) if args.json else render(data))
    return 0


# ---- the table -------------------------------------------------------------------------------
def _si(value: float, unit: str = "") -> str:
    """Three significant digits with a decimal prefix: 1.23e9 -> '1.23 G'."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _columns(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in [header, *rows]]


def _summary(data: dict[str, Any]) -> list[str]:
    p, layers, mem = data["precision"], data["layers"], data["memory_per_request"]
    kinds = ["embedding", "lm_head", "attention", "mamba", "mlp", "norms", "total"]
    params = [[label, *(_si(data["parameters"][label][k]) for k in kinds)]
              for label in ("hybrid", "twin")]
    cross = ", ".join(
        f"b={c['batch']}: " + ("never" if c["context_tokens"] is None else
                               f"{c['context_tokens']} tokens") for c in data["crossover"])
    shape, experts = data["appendix_shape"], data["experts"]
    letters = "(none: the appendix has no experts)" if shape is None else (
        f"h={shape['h']} l={shape['l']} l_attn={shape['l_attn']} l_ssd={shape['l_ssd']} "
        f"d={shape['d']}")
    routed = [] if experts is None else [
        f"experts: {experts['per_token']} of {experts['count']} a token, "
        f"{_si(experts['active_parameters'])} parameters active a token; a step reads the "
        "experts its tokens pick (uniform routing assumed)"]
    return [
        f"{data['config']}: {layers['total']} layers ({layers['attention']} attention, "
        f"{layers['mamba']} Mamba2) vs its all-attention twin", *routed,
        f"dtypes: weights {p['weights']}, KV cache {p['kv']}, Mamba state {p['state']}",
        "", "parameters", *_columns(params, ["", *kinds]), "",
        f"memory per request: hybrid KV {_si(mem['hybrid']['kv_bytes_per_token'], 'B')}/token"
        f" + state {_si(mem['hybrid']['state_bytes_per_sequence'], 'B')}/sequence; "
        f"twin KV {_si(mem['twin']['kv_bytes_per_token'], 'B')}/token",
        f"decode crossover (hybrid moves fewer bytes from this context on): {cross}",
        f"appendix letters: {letters}", "",
    ]


def render(data: dict[str, Any]) -> str:
    """The report as aligned text: a summary, then one row per (batch, context length)."""
    header = ["b", "s", "dec FLOP hyb", "twin", "dec bytes hyb", "twin", "FLOP/B hyb", "twin",
              "speed-up exact", "appendix", "prefill FLOP hyb", "twin"]
    rows = []
    for r in data["rows"]:
        hd, td = r["hybrid"]["decode"], r["twin"]["decode"]
        rows.append([str(r["batch"]), _tokens(r["seq"]), _si(hd["flops"]), _si(td["flops"]),
                     _si(hd["bytes"], "B"), _si(td["bytes"], "B"),
                     f"{hd['flops_per_byte']:.1f}", f"{td['flops_per_byte']:.1f}",
                     f"{r['decode_speedup']:.2f}x",
                     "-" if r["appendix_decode_speedup"] is None else
                     f"{r['appendix_decode_speedup']:.2f}x",
                     _si(r["hybrid"]["prefill"]["flops"]), _si(r["twin"]["prefill"]["flops"])])
    notes = ["", "speed-up = twin decode bytes / hybrid decode bytes (decode is memory-bound);",
             "'appendix' = the Bamba appendix's element ratio (13h²l + 0.5bshl) / "
             "(15.5h²l + 0.5bsh·l_attn + 4bdh·l_ssd)."]
    return "\n".join([*_summary(data), *_columns(rows, header), *notes])
