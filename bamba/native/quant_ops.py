"""Linear layers over quantized weights (fp8, int8, int4 in the compressed-tensors layout) by the
native kernels: ``quant_linear_rows`` for a few rows (``quant_rows.h``; decode: the weights
streamed and dequantized in registers) and ``quant_linear_many`` for many (prefill): a matrix
product over weights packed a panel at a time (``quant_linear_gemm``, ``quant_gemm.h``: int8 and
int4 against int8 activations in integer products where int8 activations are on, fp8 against
bf16 x in bf16 products), else output features dequantized to the activations' dtype for
torch's matmul (``quant_linear_tiles``), about ``TILE_WEIGHTS`` at a time into one buffer each
thread reuses, so the extra memory is one tile, never a dense copy of a weight.

``quant_layout`` reads a linear's ``LinearWeights`` into what the kernels take, or None when
they do not take it (then the layer's torch reference runs)."""

from __future__ import annotations

import ctypes
import functools
import math
import threading
from typing import NamedTuple

import torch
from torch.utils.flop_counter import register_flop_formula

from bamba.huge_pages import huge_page_buffer
from bamba.linear_protocol import LinearWeights
from bamba.native import library

FORMAT_CODES = {"fp8": 1, "int8": 2, "int4": 3, "iq4": 4, "int6": 5, "int5": 6}  # FORMAT_*
_BITS = {"fp8": 8, "int8": 8, "int4": 4, "iq4": 4, "int6": 6, "int5": 5}
_STORED = {"fp8": torch.float8_e4m3fn, "iq4": torch.uint8, "int6": torch.uint8,
           "int5": torch.uint8}  # else int32 words
SCALE_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # dot_rows.h's SCALE_*
SCALE_F32_OFFSETS = 3  # asymmetric ints: float32, a row's scales, then its offsets
SCALE_K_OFFSETS = 4  # K tables (bytes: two-level scales, then offsets: GGUF's Q4_K, Q5_K)
SCALE_K = 5  # a K table without offsets (bytes: two-level scales, signed sc: GGUF's Q6_K)
K_SUPER = 256  # inputs a K table's float32 d (and dmin) covers
# weights dequantized at a time for a prefill matmul (32 MB in bf16): every linear of the ~1.1B
# shape fits whole, one matmul each; tiles of 2M weights measured ~3% slower on its prefill
# (benchmarks/README.md#quantization)
TILE_WEIGHTS = 1 << 24
TILE_FEATURE_MULTIPLE = 64  # a tile's output features, unless the linear fits whole


class QuantLayout(NamedTuple):
    """A quantized weight [n, k] as the kernels read it: ``weight`` its stored tensor, one scale
    of ``scales`` per ``group`` inputs, ``scale_stride`` scales a row (0: one for all); with
    ``offsets`` (scales [n, 2, G]) a row's float32 scales are followed by as many offsets
    (asymmetric ints, w = q * scale + offset), ``scale_stride`` counting both; a K table
    (``two_level``: uint8 [n, 2, half], or [n, 1, half] without offsets,
    ``bamba.quant.formats.k_table``) counts bytes."""
    format: str
    weight: torch.Tensor
    scales: torch.Tensor
    n: int
    k: int
    group: int
    scale_stride: int
    offsets: bool = False
    two_level: bool = False

    @property
    def code(self) -> int:
        return FORMAT_CODES[self.format]

    @property
    def scale_kind(self) -> int:
        if self.two_level:
            return SCALE_K_OFFSETS if self.offsets else SCALE_K
        return SCALE_F32_OFFSETS if self.offsets else SCALE_KINDS[self.scales.dtype]


def quant_layout(w: LinearWeights, k: int) -> QuantLayout | None:
    """The kernels' view of a quantized linear of width ``k``, or None when its tensors are
    not what they read (another format or scale dtype, shapes that do not fit, not
    contiguous)."""
    if w.format not in FORMAT_CODES or w.scales is None:
        return None
    weight, scales = w.weight, w.scales
    stored = _STORED.get(w.format, torch.int32)
    n = weight.shape[0] if weight.dim() == 2 else -1
    width = k * _BITS[w.format] // (stored.itemsize * 8)
    if weight.dtype != stored or weight.shape != (n, width) or not weight.is_contiguous() or \
            not scales.is_contiguous() or weight.device.type != "cpu" or k <= 0:
        return None
    if scales.dtype == torch.uint8:
        return _k_table_layout(w.format, weight, scales, n, k)
    if scales.dtype not in SCALE_KINDS:
        return None
    if scales.dim() == 3:  # [n, 2, G] float32: a row's scales, then its offsets
        groups = scales.shape[2]
        if scales.dtype != torch.float32 or scales.shape != (n, 2, groups) or groups == 0 or \
                k % groups or w.format == "fp8":
            return None
        return QuantLayout(w.format, weight, scales, n, k, k // groups, 2 * groups, True)
    if scales.numel() == 1:  # one scale for the whole matrix
        return QuantLayout(w.format, weight, scales, n, k, k, 0)
    if scales.dim() != 2 or scales.shape[0] != n or k % scales.shape[1]:
        return None
    return QuantLayout(w.format, weight, scales, n, k, k // scales.shape[1], scales.shape[1])


def _k_table_layout(format: str, weight: torch.Tensor, table: torch.Tensor, n: int,
                    k: int) -> QuantLayout | None:
    """A K table's layout: [n, 2, 4 * k / 256 + k / 32] bytes (groups of 32 inputs, offsets),
    or int8's and int6's [n, 1, 4 * k / 256 + k / 16] (groups of 16, none), or iq4's [n, 1,
    4 * k / 256 + k / 32]."""
    if format == "fp8" or k % K_SUPER or table.dim() != 3:
        return None
    halves = table.shape[1]
    group = 32 if halves == 2 or format == "iq4" else 16
    if table.shape != (n, halves, 4 * (k // K_SUPER) + k // group) or \
            (halves == 1 and format not in ("int8", "iq4", "int6")) or \
            (halves == 2 and format in ("iq4", "int6")) or (format == "int5" and halves != 2):
        return None
    return QuantLayout(format, weight, table, n, k, group, halves * table.shape[2], halves == 2,
                       True)


def set_int8_activations(on: bool) -> bool:
    """Whether integer weights (int8, int4 and GGUF's formats) meet activations quantized to
    int8 per 32 inputs in integer dot products (``bamba.quant.formats.int8_activations``, as
    llama.cpp's Q8_0 does; the default where the CPU has AVX-512 VNNI: faster there) at every
    row count, the few-row kernel's (decode) and the prefill's product
    (``quant_linear_gemm``) alike, so a row's numbers do not depend on the rows beside it; or
    bf16 activations (``on=False``: the torch reference's numbers up to bf16 rounding) and
    dequantized tiles for many rows. Returns whether int8 activations are now in use. fp8
    weights always take the activations as they are."""
    lib = library.load()
    return lib is not None and bool(lib.bamba_quant_set_int8_activations(int(on)))


def supported(layout: QuantLayout) -> bool:
    """Whether this build's kernels take the layout's format, width and group size."""
    return format_supported(layout.code, layout.k, layout.group)


def format_supported(code: int, k: int, group: int) -> bool:
    """Whether this build's kernels take format ``code`` (``FORMAT_CODES``) at width ``k`` in
    groups of ``group`` (the library looked up each call: ``library.load.cache_clear()`` is
    seen)."""
    lib = library.load()
    return lib is not None and _build_takes(lib, code, k, group)


@functools.cache
def _build_takes(lib: ctypes.CDLL, code: int, k: int, group: int) -> bool:
    return bool(lib.bamba_quant_supported(code, k, group))


# layer_step.c's scale kinds: 0 one scale, 1 one a row, g > 1 groups of 8 << (g - 1) inputs
_GROUP_KINDS = {8 << (kind - 1): kind for kind in range(2, 8)}  # 16 (Q6_K) to 512


def step_code(layout: QuantLayout) -> int | None:
    """The layout's field of layer_step.c's formats word, or None when the layer steps do not
    take it (a group size they cannot encode, or one the kernels do not take)."""
    kind = 0 if layout.scale_stride == 0 else 1 if layout.group == layout.k \
        else _GROUP_KINDS.get(layout.group)
    if kind is None or not supported(layout):
        return None
    return layout.code | layout.scale_kind << 3 | kind << 6


def _call_linear(entry: str, x: torch.Tensor, layout: QuantLayout, bias: torch.Tensor | None
                 ) -> tuple[int, torch.Tensor]:
    """The library's ``entry`` (bamba_quant_linear or bamba_quant_gemm, the same arguments) on
    x's rows: its status and y [rows, n]."""
    rows = x.reshape(-1, layout.k).contiguous()
    y = torch.empty(rows.shape[0], layout.n, dtype=x.dtype)
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    status = getattr(library.load(), entry)(
        rows.data_ptr(), int(x.dtype == torch.bfloat16), layout.weight.data_ptr(), layout.code,
        layout.scales.data_ptr(), layout.scale_kind, layout.group, layout.scale_stride,
        None if bias is None else bias.data_ptr(), y.data_ptr(), rows.shape[0], layout.n,
        layout.k, torch.get_num_threads())
    return status, y


def _call_rows(x: torch.Tensor, layout: QuantLayout, bias: torch.Tensor | None) -> torch.Tensor:
    status, y = _call_linear("bamba_quant_linear", x, layout, bias)
    if status != 0:
        raise RuntimeError(f"quant_linear_rows: unsupported here ({layout.format}, width "
                           f"{layout.k}, group {layout.group})")
    return y.view(*x.shape[:-1], layout.n)


@torch.library.custom_op("bamba::quant_linear_rows", mutates_args=(), device_types="cpu")
def _quant_linear_op(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                     bias: torch.Tensor | None, format: str) -> torch.Tensor:
    layout = quant_layout(LinearWeights(format, weight, bias, scales), x.shape[-1])
    if layout is None:
        raise ValueError(f"quant_linear_rows: {format} weight {tuple(weight.shape)} "
                         f"{weight.dtype} with scales {tuple(scales.shape)} does not fit "
                         f"input width {x.shape[-1]}")
    return _call_rows(x, layout, bias)


@_quant_linear_op.register_fake
def _(x, weight, scales, bias, format):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@register_flop_formula(torch.ops.bamba.quant_linear_rows)
def _quant_flops(x_shape, weight_shape, *args, **kwargs) -> int:
    """For torch's FlopCounterMode: 2 x rows x out x in, as for the matmul it replaces."""
    return 2 * math.prod(x_shape[:-1]) * weight_shape[0] * x_shape[-1]


def quant_linear_rows(x: torch.Tensor, layout: QuantLayout, bias: torch.Tensor | None,
                      through_dispatcher: bool) -> torch.Tensor:
    """y = x W^T (+ bias) for a few rows (``dispatch.quant_linear_fits``), the weights streamed
    once and dequantized in registers; float32 accumulation (float32 x is rounded to bf16)."""
    if through_dispatcher:
        return _quant_linear_op(x, layout.weight, layout.scales, bias, layout.format)
    return _call_rows(x, layout, bias)


_tiles = threading.local()  # each thread's buffer of dequantized weights, by dtype


def _tile_buffer(rows: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """This thread's reused [rows, k] buffer of ``dtype``, grown to the largest tile asked, in
    huge pages (a fresh allocation a tile cost ~10% of a quantized prefill in page faults; huge
    pages against 4 KiB ones ~2% more: the matmul streams the tile)."""
    buffers = _tiles.__dict__.setdefault("by_dtype", {})
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < rows * k:
        buffer = buffers[dtype] = huge_page_buffer(rows * k * dtype.itemsize).view(dtype)
    return buffer[:rows * k].view(rows, k)


def dequantize_tile(layout: QuantLayout, begin: int, end: int, dtype: torch.dtype,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Weight rows [begin, end) as a dense [end - begin, k] tensor of ``dtype`` (bf16 or
    float32): q * scale rounded once; written into ``out`` (contiguous) when given."""
    if out is None:
        out = torch.empty(end - begin, layout.k, dtype=dtype)
    if not out.is_contiguous() or out.dtype != dtype or out.shape != (end - begin, layout.k):
        raise ValueError(f"dequantize_tile: out must be a contiguous {dtype} "
                         f"[{end - begin}, {layout.k}], not {out.dtype} {tuple(out.shape)}")
    library.load().bamba_quant_dequantize(
        layout.weight.data_ptr(), layout.code, layout.scales.data_ptr(), layout.scale_kind,
        layout.group, layout.scale_stride, begin, end, layout.k, out.data_ptr(),
        int(dtype == torch.bfloat16), torch.get_num_threads())
    return out


def quant_gather(layout: QuantLayout, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``ids`` of the quantized weights as [*ids.shape, k] of ``dtype`` (bf16 or float32):
    an embedding lookup, each value q * scale rounded once as ``dequantize_tile`` rounds it.
    IndexError, as torch's embedding raises it, when an id lies outside the rows."""
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty(flat.shape[0], layout.k, dtype=dtype)
    status = library.load().bamba_quant_gather(
        layout.weight.data_ptr(), layout.code, layout.scales.data_ptr(), layout.scale_kind,
        layout.group, layout.scale_stride, layout.n, flat.data_ptr(), flat.shape[0], layout.k,
        out.data_ptr(), int(dtype == torch.bfloat16))
    if status != 0:
        raise IndexError("index out of range in self")
    return out.view(*ids.shape, layout.k)


def quant_linear_gemm(x: torch.Tensor, layout: QuantLayout,
                      bias: torch.Tensor | None) -> torch.Tensor | None:
    """y = x W^T (+ bias) for many rows, weights packed a panel at a time as the products read
    them (never a dense copy): int8 or int4 weights against x quantized to int8 per 32 inputs
    (``bamba.quant.formats.int8_activations``) in integer products, fp8 ones dequantized to
    bf16 against bf16 x in bf16 products; float32 accumulation. None where the kernel does not
    take it (int8 or int4 with int8 activations off, fp8 with float32 x, groups that are not
    whole blocks of 32 inputs, an output count that is not a multiple of 4)."""
    if x.dtype not in (torch.bfloat16, torch.float32):
        return None
    status, y = _call_linear("bamba_quant_gemm", x, layout, bias)
    if status == -1:
        return None
    if status != 0:
        raise MemoryError(f"quant_linear_gemm: no memory to pack {y.shape[0]} rows of "
                          f"width {layout.k}")
    return y.view(*x.shape[:-1], layout.n)


def quant_linear_many(x: torch.Tensor, layout: QuantLayout,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """y = x W^T (+ bias) for many rows: ``quant_linear_gemm`` where it takes the layout, else
    ``quant_linear_tiles``."""
    y = quant_linear_gemm(x, layout, bias)
    return y if y is not None else quant_linear_tiles(x, layout, bias)


def quant_linear_tiles(x: torch.Tensor, layout: QuantLayout, bias: torch.Tensor | None,
                       tile_weights: int = TILE_WEIGHTS) -> torch.Tensor:
    """y = x W^T (+ bias) for many rows: as many output features at a time as fit in
    ``tile_weights`` weights (a multiple of 64 features, at least 64) dequantized to x's dtype
    (bf16 or float32) and multiplied by torch's matmul; a linear that fits is one matmul."""
    rows = x.reshape(-1, layout.k)
    bias = None if bias is None else bias.to(x.dtype)
    tile = layout.n if layout.n * layout.k <= tile_weights else min(layout.n, max(
        TILE_FEATURE_MULTIPLE,
        tile_weights // layout.k // TILE_FEATURE_MULTIPLE * TILE_FEATURE_MULTIPLE))
    buffer = _tile_buffer(tile, layout.k, x.dtype)
    tiles = [(begin, min(begin + tile, layout.n)) for begin in range(0, layout.n, tile)]
    y = None if len(tiles) == 1 else torch.empty(rows.shape[0], layout.n, dtype=x.dtype)
    for begin, end in tiles:
        weight = dequantize_tile(layout, begin, end, x.dtype, buffer[:end - begin]).t()
        part = torch.mm(rows, weight) if bias is None else \
            torch.addmm(bias[begin:end], rows, weight)
        if y is None:
            return part.view(*x.shape[:-1], layout.n)
        y[:, begin:end] = part
    return y.view(*x.shape[:-1], layout.n)

