"""Dense linear layers by the library: for a few rows (decode) in bf16 (AVX-512 BF16) or
float32 (AVX-512), streaming the weights once (``linear.c``: ``torch.ops.bamba.linear_rows``);
for more bf16 rows (prefill), the panel product of ``quant_gemm.h`` (``gemm_rows``)."""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula

from bamba.native import library

_FUNCTIONS = {torch.bfloat16: "bamba_linear_bf16", torch.float32: "bamba_linear_f32"}
DENSE_FORMAT = 0  # dot_rows.h's FORMAT_DENSE


@torch.library.custom_op("bamba::linear_rows", mutates_args=(), device_types="cpu")
def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ weight.T (+ bias) for a few rows (see ``dispatch.linear_fits``), streaming the
    weight once with float32 accumulation. Same contract as ``F.linear``."""
    return call_rows(x, weight, bias)


def call_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``linear_rows`` without torch's dispatcher (eager callers that time the kernel alone)."""
    lib = library.load()
    k, n = x.shape[-1], weight.shape[0]
    rows = x.reshape(-1, k).contiguous()
    if weight.shape != (n, k) or (bias is not None and bias.shape != (n,)) or \
            weight.dtype != x.dtype:
        raise ValueError(f"linear_rows: weight {tuple(weight.shape)} {weight.dtype} does not "
                         f"match input width {k} {x.dtype}")
    y = torch.empty(rows.shape[0], n, dtype=x.dtype)
    bias_ptr = None if bias is None else bias.to(x.dtype).contiguous().data_ptr()
    fn = None if lib is None or x.dtype not in _FUNCTIONS else getattr(lib, _FUNCTIONS[x.dtype])
    if fn is None or fn(rows.data_ptr(), weight.data_ptr(), bias_ptr, y.data_ptr(),
                        rows.shape[0], n, k, torch.get_num_threads()) != 0:
        raise RuntimeError(f"linear_rows: unsupported here ({rows.shape[0]} rows, width {k}, "
                           f"{x.dtype})")
    return y.view(*x.shape[:-1], n)


@linear_rows.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@register_flop_formula(torch.ops.bamba.linear_rows)
def _linear_rows_flops(x_shape, weight_shape, bias_shape=None, *args, **kwargs) -> int:
    """For torch's FlopCounterMode: 2 x rows x out x in, as for the matmul it replaces."""
    return 2 * math.prod(x_shape[:-1]) * weight_shape[0] * weight_shape[1]


def gemm_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
              ) -> torch.Tensor | None:
    """y = x @ weight.T (+ bias) for many bf16 rows (``dispatch.gemm_fits``) by the panel
    product of ``quant_gemm.h``: 64 weight rows at a time copied into the tiles' order (in L2)
    and read once for every 48 rows of x, float32 sums of bf16 products, each row's sums in
    one order whatever the rows beside it. None where this build or shape is not taken."""
    lib = library.load()
    if lib is None:
        return None
    k, n = x.shape[-1], weight.shape[0]
    rows = x.reshape(-1, k).contiguous()
    y = torch.empty(rows.shape[0], n, dtype=x.dtype)
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    status = lib.bamba_quant_gemm(rows.data_ptr(), 1, weight.data_ptr(), DENSE_FORMAT, None, 0,
                                  k, 0, None if bias is None else bias.data_ptr(), y.data_ptr(),
                                  rows.shape[0], n, k, torch.get_num_threads())
    if status == -1:
        return None
    if status != 0:
        raise MemoryError(f"gemm_rows: no memory to pack {rows.shape[0]} rows of width {k}")
    return y.view(*x.shape[:-1], n)
