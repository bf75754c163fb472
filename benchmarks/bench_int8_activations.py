"""int8 and int4 weights at decode: int8 activations and integer dot products against bf16
activations.

The few-row kernel meets int8 and int4 weights, at 1 to 8 rows, with activations quantized to
int8 per 32 inputs (``bamba.native.quant_ops.set_int8_activations``, quant_int8_dot.h); this
measures that choice, in one process, the two settings in rotation (--rounds; the best round is
kept):

* speed: the decode step of a random-weight model quantized to each --schemes (int8 per
  channel, int4 in groups of --group-size, 128 by default) at batch 1, 2, 3, 4 and 8, for each
  --shapes (``bench``, hidden 512; ``1b``, hidden 1536: bench_quant's shapes), with bf16 beside
  at batch 1;
* quality: with a trained checkpoint (--trained, e.g. the demo's), the mean negative
  log-likelihood of held-out text (the first tokens of the standard library's own tests, which
  the demo does not train on) scored token by token through the decode step, the path these
  kernels run, for bf16 weights and for each scheme with each setting.

    python benchmarks/bench_int8_activations.py --trained ~/.cache/bamba/demo/train/hf
    python benchmarks/bench_int8_activations.py --quick        # tiny shape: a smoke test

Writes benchmarks/results/int8_activations.json (--output).
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from bench_quant import SHAPES  # noqa: E402
from host import describe_host, write_json  # noqa: E402
from measure import decode_seconds  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "int8_activations.json"
BATCHES = (1, 2, 3, 4, 8)
SCHEMES = ("int8", "int4")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["bench", "1b"], choices=sorted(SHAPES))
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    p.add_argument("--group-size", type=int, default=128, help="int4 group size")
    p.add_argument("--rounds", type=int, default=2, help="rotations over the two settings")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per measurement")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--trained", type=Path, help="a trained checkpoint for the quality figure")
    p.add_argument("--files", type=int, default=6, help="held-out files scored")
    p.add_argument("--tokens", type=int, default=400, help="tokens scored a file at most")
    p.add_argument("--quick", action="store_true", help="tiny shape, 1 round, few steps")
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.rounds, args.steps, args.group_size = ["tiny"], 1, 4, 16
    return args


def quantized(model: Any, scheme: str, args: argparse.Namespace) -> Any:
    """int8 per channel, int4 in groups of --group-size."""
    from bamba.native import accelerate
    from bamba.quant.apply import quantize_model
    from bamba.quant.formats import make_scheme

    group = args.group_size if scheme == "int4" else None
    return accelerate(quantize_model(model, make_scheme(scheme, group)))


def speed(shape: str, args: argparse.Namespace) -> dict[str, Any]:
    """Decode tok/s per scheme and batch with int8 activations on and off (best round), bf16
    at batch 1."""
    import torch

    from bamba.config import preset
    from bamba.model import BambaLM, cast, init_weights
    from bamba.native import accelerate, quant_ops

    name, overrides = SHAPES[shape]

    def fresh() -> Any:
        return cast(init_weights(BambaLM(preset(name, **overrides)), seed=0),
                    torch.bfloat16).eval()

    result: dict[str, Any] = {
        "bf16_weights_b1_tok_s": round(1 / decode_seconds(accelerate(fresh()), 1, args.steps), 1)}
    for scheme in args.schemes:
        model = quantized(fresh(), scheme, args)
        best: dict[tuple[bool, int], float] = {}
        for _ in range(args.rounds):
            for on in (False, True):
                quant_ops.set_int8_activations(on)
                for batch in BATCHES:
                    tok_s = batch / decode_seconds(model, batch, args.steps)
                    best[on, batch] = max(best.get((on, batch), 0.0), tok_s)
        quant_ops.set_int8_activations(True)
        result[f"{scheme}_weights"] = [
            {"batch": b, "bf16_activations_tok_s": round(best[False, b], 1),
             "int8_activations_tok_s": round(best[True, b], 1),
             "ratio": round(best[True, b] / best[False, b], 3)} for b in BATCHES]
        del model
    return result


def held_out(tokenizer: Any, args: argparse.Namespace) -> list[list[int]]:
    tests = sorted((Path(sysconfig.get_paths()["stdlib"]) / "test").glob("test_*.py"))
    return [tokenizer.encode(f.read_text(errors="replace"))[:args.tokens]
            for f in tests[:args.files]]


def decode_nll(model: Any, docs: list[list[int]]) -> tuple[float, int]:
    """Mean negative log-likelihood of every next token, one decode step at a time."""
    import torch

    from bamba.cache import ContiguousCache

    total, count = 0.0, 0
    with torch.inference_mode():
        for ids in docs:
            cache = ContiguousCache(model.config, 1, len(ids), model.dtype)
            for i in range(len(ids) - 1):
                logits = model(torch.tensor([[ids[i]]]), positions=torch.tensor([[i]]),
                               cache=cache)[0, -1].float()
                total -= torch.log_softmax(logits, -1)[ids[i + 1]].item()
                count += 1
    return total / count, count


def quality(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from bamba.checkpoint import from_pretrained
    from bamba.native import accelerate, quant_ops
    from bamba.tokenizer import load_tokenizer

    docs = held_out(load_tokenizer(str(args.trained)), args)

    def load() -> Any:
        return from_pretrained(str(args.trained), dtype=torch.bfloat16).eval()

    out: dict[str, Any] = {"checkpoint": str(args.trained), "held_out":
                           f"the first {args.tokens} tokens of the first {args.files} "
                           f"Lib/test/test_*.py"}
    nll, out["tokens"] = decode_nll(accelerate(load()), docs)
    out["bf16"] = {"nll": round(nll, 5), "perplexity": round(math.exp(nll), 3)}
    for scheme in args.schemes:
        model = quantized(load(), scheme, args)
        for on in (True, False):
            quant_ops.set_int8_activations(on)
            q_nll, _ = decode_nll(model, docs)
            out[f"{scheme}_{'int8' if on else 'bf16'}_activations"] = {
                "nll": round(q_nll, 5), "perplexity": round(math.exp(q_nll), 3),
                "vs_bf16": round(math.exp(q_nll - nll) - 1, 5)}
        quant_ops.set_int8_activations(True)
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    from bamba.cores import in_passing_thread
    from bamba.native import quant_ops

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not in_passing_thread(lambda: quant_ops.set_int8_activations(True)):
        print("this CPU or build has no AVX-512 VNNI: int8 activations are not in use")
        return 1
    report: dict[str, Any] = {"benchmark": "int8/int4 weights at decode: int8 vs bf16 "
                                            "activations",
                              "host": in_passing_thread(lambda: describe_host(quick=args.quick)),
                              "settings": {k: str(v) for k, v in vars(args).items()}}
    report["shapes"] = {s: in_passing_thread(lambda s=s: speed(s, args)) for s in args.shapes}
    if args.trained is not None:
        report["quality"] = in_passing_thread(lambda: quality(args))
    for shape, result in report["shapes"].items():
        print(f"{shape}: bf16 weights {result['bf16_weights_b1_tok_s']} tok/s at batch 1")
        for scheme in args.schemes:
            for row in result[f"{scheme}_weights"]:
                print(f"  batch {row['batch']}: {scheme} weights, bf16 activations "
                      f"{row['bf16_activations_tok_s']} tok/s, int8 activations "
                      f"{row['int8_activations_tok_s']} ({row['ratio']:.2f}x)")
    if "quality" in report:
        print({k: v for k, v in report["quality"].items() if isinstance(v, dict)})
    write_json(args.output, report)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
