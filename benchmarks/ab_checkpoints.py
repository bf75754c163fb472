"""Checkpoints of one model in one process, alternating: decode (batch 1 and 8, or --batches)
and a prefill, each checkpoint loaded once (bf16, native kernels) and timed in turns whose
order flips every turn, so a drift in the machine's memory speed hits all alike. For layouts
of the same weights (say int4 with a Granite MoE's experts quantized or kept in bf16, as
`bamba quantize --ignore` chooses), where two processes minutes apart would measure two
memory spells.

    python benchmarks/ab_checkpoints.py DIR_A DIR_B [--turns 5] [--batches 1 8 32]
                                       [--dense-experts] [--flat-scales] [--dense-table]
                                       [--int8-values] [--output out.json]

A checkpoint is a directory or a GGUF file. ``--dense-experts`` adds each one again with its
quantized experts dequantized to a bf16 stack (what a GGUF file's K-quant experts loaded as
before they stayed in their blocks); ``--flat-scales`` each one with its two-level scales
(Q4_K, Q5_K, Q6_K) as a float32 scale (and offset) a group (how they loaded before);
``--dense-table`` each one with its quantized token table, and a head tied to it, dequantized
to bf16 (how a GGUF file's tied table loaded before the head read its blocks);
``--int8-values`` each one with the weights it holds in fewer bits than their int8 values
(IQ4_NL's and IQ4_XS's nibbles indexing their levels, Q6_K's 6 bits, Q5_K's 5) as those int8
values (how such files loaded before: Q6_K's and Q5_K's under their K tables, IQ4's under float
scales).
``--llama-bench`` has llama.cpp's ``llama-bench`` decode (batch 1) and prefill each GGUF file
in every turn too, right after bamba's turn on it (the same bytes on both sides, the same
memory spell). Prints and (with --output) writes each
one's median tok/s over the turns, its size on disk, the bytes its model holds, and the host.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from host import describe_host, write_json  # noqa: E402
from measure import decode_seconds, prefill_seconds, run_llama_bench  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--turns", type=int, default=5, help="turns over the checkpoints")
    parser.add_argument("--steps", type=int, default=24,
                        help="timed decode steps a turn at batch 1 (half that at larger ones)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8],
                        help="decode batch sizes")
    parser.add_argument("--prompt", type=int, default=512, help="prefill tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dense-experts", action="store_true",
                        help="also time each checkpoint with its quantized experts dequantized "
                             "to bf16 (a Granite MoE's experts as a dense stack)")
    parser.add_argument("--flat-scales", action="store_true",
                        help="also time each checkpoint with its two-level scales (a GGUF "
                             "file's Q4_K / Q5_K / Q6_K) as a float32 scale (and offset) a group")
    parser.add_argument("--dense-table", action="store_true",
                        help="also time each checkpoint with its quantized token table (and a "
                             "head tied to it) dequantized to bf16")
    parser.add_argument("--int8-values", action="store_true",
                        help="also time each checkpoint with its IQ4 nibbles (a GGUF file's "
                             "IQ4_NL / IQ4_XS) and 6- and 5-bit values (Q6_K, Q5_K) as int8 "
                             "values")
    parser.add_argument("--llama-bench", action="store_true",
                        help="llama-bench decodes (batch 1) and prefills each GGUF file too, "
                             "a turn beside bamba's")
    parser.add_argument("--output", type=Path, help="also write the results here as JSON")
    args = parser.parse_args(argv)
    if args.turns < 1 or min(args.batches) < 1:
        parser.error("--turns and every --batches must be at least 1")
    from bamba.checkpoint import from_pretrained
    from bamba.native import accelerate
    from bamba.quant.apply import dequantize_model
    from bamba.arena import pack_weights
    from bamba.quant.embedding import QuantizedEmbedding
    from bamba.quant.experts import QuantizedExpertWeights

    torch.set_num_threads(args.threads)
    models = {}
    for path in args.checkpoints:
        models[str(path)] = path, accelerate(from_pretrained(path, dtype=torch.bfloat16))
        if args.dense_experts:
            dense = dequantize_model(from_pretrained(path, dtype=torch.bfloat16), torch.bfloat16,
                                     kinds=(QuantizedExpertWeights,))
            models[f"{path} (experts bf16)"] = path, accelerate(dense)
        if args.flat_scales:
            flat = flat_scales(from_pretrained(path, dtype=torch.bfloat16))
            models[f"{path} (flat scales)"] = path, accelerate(flat)
        if args.dense_table:
            table = dequantize_model(from_pretrained(path, dtype=torch.bfloat16), torch.bfloat16,
                                     kinds=(QuantizedEmbedding,))
            models[f"{path} (table bf16)"] = path, accelerate(pack_weights(table))
        if args.int8_values and any(_held_in_fewer_bits(getattr(m, "scheme", None))
                                    for m in models[str(path)][1].modules()):
            int8 = int8_values(from_pretrained(path, dtype=torch.bfloat16))
            models[f"{path} (int8 values)"] = path, accelerate(int8)
    times: dict[str, dict[int | str, list[float]]] = {
        name: {**{b: [] for b in args.batches}, "prefill": [], "llama_b1": [],
               "llama_prefill": []} for name in models}
    for turn in range(args.turns):
        order = list(models.items())
        for name, (_, model) in order if turn % 2 == 0 else reversed(order):
            for batch in args.batches:
                steps = args.steps if batch == 1 else max(args.steps // 2, 1)
                times[name][batch].append(decode_seconds(model, batch, steps))
            times[name]["prefill"].append(prefill_seconds(model, args.prompt))
            path = models[name][0]
            if args.llama_bench and path.is_file() and name == str(path):
                decode, prefill = llama_bench_seconds(path, args)
                times[name]["llama_b1"].append(decode)
                times[name]["llama_prefill"].append(prefill)
    results = {name: {
        "disk_mb": round(disk_bytes(models[name][0]) / 1e6, 1),
        "model_mb": round(held_bytes(models[name][1]) / 1e6, 1),
        **{f"decode_b{b}_tok_s": round(b / statistics.median(t[b]), 1) for b in args.batches},
        f"prefill_{args.prompt}_tok_s": round(args.prompt / statistics.median(t["prefill"]), 1),
        **({} if not t["llama_b1"] else {
            "llama_cpp_decode_b1_tok_s": round(1 / statistics.median(t["llama_b1"]), 1),
            f"llama_cpp_prefill_{args.prompt}_tok_s":
                round(args.prompt / statistics.median(t["llama_prefill"]), 1)})}
        for name, t in times.items()}
    print(json.dumps(results, indent=1))
    if args.output is not None:
        write_json(args.output, {"benchmark": "ab_checkpoints", "host": describe_host(),
                                 "settings": {k: str(v) for k, v in vars(args).items()},
                                 "results": results})


def llama_bench_seconds(gguf: Path, args: argparse.Namespace) -> tuple[float, float]:
    """llama-bench's seconds a token of batch-1 decode (``--steps`` tokens) and seconds of a
    ``--prompt``-token prefill, one repetition each after its warm-up."""
    rows, _ = run_llama_bench(gguf, args.threads, ["-p", f"0,{args.prompt}", "-n",
                                                   f"{args.steps},0", "-r", "1"])
    return 1 / rows[(0, args.steps, 0)]["tok_s"], args.prompt / rows[(args.prompt, 0, 0)]["tok_s"]


def flat_scales(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every two-level table (Q4_K, Q5_K, Q6_K) as float32: a table of a scale
    and an offset a group, or Q6_K's float32 scale a group, the same numbers (how those blocks
    loaded before they were held as stored), repacked into one huge-page arena as loading packs
    them; a head tied to the token table reads the new one."""
    from bamba.arena import pack_weights
    from bamba.quant.formats import k_table_values

    for module in model.modules():
        scheme = getattr(module, "scheme", None)
        if scheme is not None and scheme.two_level:
            scale, offset = k_table_values(module.weight_table, module.dense_shape[1], scheme)
            module.scheme = scheme._replace(two_level=False)
            if offset is None:  # Q6_K
                del module.weight_table
                module.register_buffer("weight_scale", scale.contiguous())
            else:
                module.weight_table = torch.stack([scale, offset], dim=1).contiguous()
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return pack_weights(model)


def _held_in_fewer_bits(scheme) -> bool:
    return scheme is not None and (scheme.levels or bool(scheme.held_bits))


def int8_values(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` as such files loaded before their values were held in fewer bits: Q6_K's
    6-bit and Q5_K's 5-bit values as int8 bytes under the same K table (Q5_K's as u, its
    offsets centred at 0 again), IQ4's nibbles as int8 values of their
    levels under a float32 scale a group (or IQ4_NL's float16 ones), as a checkpoint saves
    them; the same numbers, repacked into one huge-page arena as loading packs them; a head
    tied to the token table reads the new one."""
    from bamba.arena import pack_weights
    from bamba.quant.formats import k_centre, pack_ints, quantized_values, saved_scheme

    for module in model.modules():
        scheme = getattr(module, "scheme", None)
        if scheme is not None and scheme.held_bits:
            int8 = scheme._replace(held_bits=None)
            values = quantized_values(module.quantized_tensors(), scheme) + \
                (k_centre(scheme) - k_centre(int8) if scheme.offsets else 0)
            module.weight_packed = pack_ints(values.to(torch.int8), 8)
            module.scheme = int8
        elif scheme is not None and scheme.levels:
            saved = module.saved_tensors()
            for name in scheme.tensor_names():
                delattr(module, name)
            module.scheme = saved_scheme(scheme)
            for name, tensor in saved.items():
                module.register_buffer(name, tensor.contiguous())
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return pack_weights(model)


def disk_bytes(path: Path) -> int:
    """A GGUF file's size, or a checkpoint directory's safetensors'."""
    return path.stat().st_size if path.is_file() else \
        sum(f.stat().st_size for f in path.glob("*.safetensors"))


def held_bytes(model: torch.nn.Module) -> int:
    """The bytes of a model's parameters and buffers (a tied tensor once) and of the tables
    its quantized modules derived for the kernels (a zero-point weight's scales and offsets)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    for module in model.modules():
        derived = module.__dict__.get("_kernel_scales")
        if derived is not None:
            tensors[id(derived[1])] = derived[1]
    return sum(t.numel() * t.element_size() for t in tensors.values())


if __name__ == "__main__":
    main()
