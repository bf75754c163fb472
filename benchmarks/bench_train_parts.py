"""The training step's parts that have two implementations, each timed both ways, compiled,
forward + backward, at the demo and bench training shapes (2 threads):

* conv: the Mamba2 mixer's causal conv + silu as the native op ``bamba.native.train_ops``
  (what training runs) vs the torch ops ``bamba.ops.conv.causal_conv1d`` + silu;
* attention: packed rows (document mask) through the matmul formulation
  (``bamba.ops.attention.matmul_attention``, what training on rows of at most
  ``TRAIN_MATMUL_MAX_LEN`` tokens runs) vs the flash kernel with the mask, at 256 and 512 tokens.

The two implementations of a part are timed in alternation (A B B A ...) in one process; the
median of --repeats is reported in ms. Writes benchmarks/results/train_parts.json.

    python benchmarks/bench_train_parts.py
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from bamba.config import preset
from bamba.native import dispatch
from bamba.ops.attention import causal_mask, matmul_attention
from bamba.ops.conv import causal_conv1d

sys.path.insert(0, str(Path(__file__).parent))
from engine_decode import Timing, time_alternating  # noqa: E402
from host import describe_host, write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "train_parts.json"
# name -> (preset, batch, seq_len): bench_train.py's training shapes
SHAPES = {"demo": ("tiny", 8, 256), "bench": ("bench", 2, 256)}


def time_pair(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median ms of each callable, timed in alternation after two warm-up calls each (the
    engine benchmark's ``time_alternating``, one call a repeat)."""
    timed = time_alternating({k: (lambda _b, _s, fn=fn: fn()) for k, fn in fns.items()}, 0, 0,
                             Timing(steps=1, repeats=repeats, warmup=2))
    return {k: round(t["step_s"] * 1e3, 3) for k, t in timed.items()}


def fwd_bwd(fn: Callable[..., torch.Tensor], *leaves: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        for t in leaves:
            t.grad = None
        fn(*leaves).float().sum().backward()
    return run


def conv_case(name: str, repeats: int) -> dict:
    cfg_name, b, l = SHAPES[name]
    cfg = preset(cfg_name)
    d, k = cfg.conv_dim, cfg.mamba_d_conv
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(b, l, d + cfg.d_inner, generator=gen)  # a slice of in_proj's output
    x = wide[..., cfg.d_inner:].detach().requires_grad_()
    w = torch.randn(d, k, generator=gen).requires_grad_()
    bias = torch.randn(d, generator=gen).requires_grad_()
    seq_idx = torch.zeros(b, l, dtype=torch.long)
    native = torch.compile(lambda x, w, bias: torch.ops.bamba.conv_silu(x, w, bias, seq_idx))
    ops = torch.compile(lambda x, w, bias: F.silu(causal_conv1d(x, w, bias, None, seq_idx)[0]))
    ms = time_pair({"native op": fwd_bwd(native, x, w, bias),
                    "torch ops": fwd_bwd(ops, x, w, bias)}, repeats)
    return {"shape": [b, l, d], "kernel": k, "ms": ms}


def attention_case(name: str, seq_len: int, repeats: int) -> dict:
    cfg_name, b, l = SHAPES[name]
    cfg = preset(cfg_name)
    b = b * l // seq_len  # the same tokens per step
    gen = torch.Generator().manual_seed(0)
    h, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q, k, v = (torch.randn(b, seq_len, n, hd, generator=gen, dtype=torch.bfloat16)
               .requires_grad_() for n in (h, hkv, hkv))
    mask = causal_mask(torch.arange(seq_len).expand(b, seq_len), seq_len,
                       torch.zeros(b, seq_len, dtype=torch.long))
    flash = torch.compile(lambda q, k, v: _flash(q, k, v, mask))
    matmul = torch.compile(lambda q, k, v: matmul_attention(q, k, v, mask))
    ms = time_pair({"matmul": fwd_bwd(matmul, q, k, v), "flash": fwd_bwd(flash, q, k, v)},
                   repeats)
    return {"batch": b, "seq_len": seq_len, "heads": [h, hkv, hd], "ms": ms}


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The flash kernel with the document mask (what ``attention`` runs beyond the threshold)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not dispatch.conv_train_available():
        raise SystemExit("the native training kernels are not built for this CPU")
    host = describe_host()
    report = {"benchmark": "training parts, compiled forward + backward, ms (median)", "host": host,
              "conv": {n: conv_case(n, args.repeats) for n in SHAPES},
              "attention": {f"{n} {s}": attention_case(n, s, args.repeats)
                            for n in SHAPES for s in (256, 512)},
              "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "load_average_after": os.getloadavg()}
    write_json(args.output, report)
    for n, r in report["conv"].items():
        print(f"conv {n} {r['shape']}: {r['ms']}")
    for n, r in report["attention"].items():
        print(f"attention {n} (batch {r['batch']}): {r['ms']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
