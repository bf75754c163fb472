"""The one place that decides whether a native kernel fits a call, and whether a kernel's
Python wrapper calls its registered torch op or the library directly.

Every check is here: the kernels need the library built for this CPU, tensors on the CPU in a
dtype they take, no autograd (training keeps torch's ops, except for the conv kernel, which has
a backward), and sizes their vector loops divide. The accelerated modules
(``bamba.native.seam``) ask these functions before each kernel call and otherwise run the
torch reference.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from bamba.linear_protocol import LinearWeights
from bamba.native import library, quant_ops
from bamba.native.quant_ops import QuantLayout

class LayerDims(NamedTuple):
    """The sizes layer_step.c needs, in its order. An attention layer has d_inner, conv_dim,
    conv_kernel and d_state 0, heads query heads and groups KV heads of head_dim."""
    hidden: int
    d_inner: int
    conv_dim: int
    conv_kernel: int
    heads: int
    head_dim: int
    groups: int
    d_state: int
    ffn: int
    experts: int = 0  # a mixture of experts beside the MLP: how many,
    top_k: int = 0  # how many a token,
    expert_ffn: int = 0  # an expert's inner width,
    expert_formats: int = 0  # and its weights' layer-step codes (gate-up | down << 7; 0 dense)


KERNEL_DTYPES = (torch.bfloat16, torch.float32)
MAX_LINEAR_ROWS = 8  # beyond, oneDNN's matmul catches up (few-row kernels are bandwidth-bound)
MAX_GEMM_ROWS = 128  # bf16 rows of the dense panel product; beyond, oneDNN's matmul is as fast
MAX_ROWS = 32  # decode rows of the layer steps (benchmarks/bench_native.py, bf16)
# dtype -> (bit of bamba_linear_supported, input width multiple)
_LINEAR = {torch.bfloat16: (1, 32), torch.float32: (2, 16)}


def through_dispatcher() -> bool:
    """Inside torch.compile (a graph can only hold ops), or under a dispatch mode such as
    FlopCounterMode that must see the op. Otherwise eager callers go to the library directly:
    a Python custom op costs ~0.1 ms a call through the dispatcher."""
    return torch.compiler.is_compiling() or is_in_torch_dispatch_mode()


# Availability: known once per process (a compiled graph bakes in the answer, not the build).

@torch.compiler.assume_constant_result
def library_available() -> bool:
    """True when the native library is built and loaded (and not disabled by BAMBA_NATIVE=0)."""
    return library.load() is not None


def ssd_step_available() -> bool:
    """True when the one-pass SSM step kernel can run (it is in every build of the library)."""
    return library_available()


@torch.compiler.assume_constant_result
def linear_available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """True when the few-row linear kernel for ``dtype`` is built for this CPU (bf16 needs
    AVX-512 BF16, float32 AVX-512)."""
    lib = library.load()
    return lib is not None and dtype in _LINEAR and \
        bool(lib.bamba_linear_supported() & _LINEAR[dtype][0])


@torch.compiler.assume_constant_result
def prefill_available() -> bool:
    """True when the Mamba2 prefill kernels are built for this CPU (AVX-512 BF16)."""
    lib = library.load()
    return lib is not None and bool(lib.bamba_prefill_supported())


@torch.compiler.assume_constant_result
def conv_train_available() -> bool:
    """True when the training conv kernels are built for this CPU (AVX-512)."""
    lib = library.load()
    return lib is not None and bool(lib.bamba_conv_train_supported())


def _grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# Per call: does this kernel take these tensors?

def linear_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """x @ weight.T by the few-row kernel: bf16 or float32 CPU tensors of one dtype without
    autograd, at most ``MAX_LINEAR_ROWS`` rows, an input width the kernel's vectors divide."""
    return x.dtype == weight.dtype and x.dtype in _LINEAR and x.device.type == "cpu" \
        and not _grad(x, weight) and weight.is_contiguous() \
        and x.numel() // x.shape[-1] <= MAX_LINEAR_ROWS \
        and x.shape[-1] % _LINEAR[x.dtype][1] == 0 and linear_available(x.dtype)


def gemm_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """x @ weight.T by the dense panel product (``linear_ops.gemm_rows``): bf16 CPU tensors
    without autograd, eagerly, more than ``MAX_LINEAR_ROWS`` rows and at most
    ``MAX_GEMM_ROWS``, an input width a multiple of 64 and outputs a multiple of 4."""
    return x.dtype == weight.dtype == torch.bfloat16 and x.device.type == "cpu" \
        and not _grad(x, weight) and weight.is_contiguous() \
        and MAX_LINEAR_ROWS < x.numel() // x.shape[-1] <= MAX_GEMM_ROWS \
        and x.shape[-1] % 64 == 0 and weight.shape[0] % 4 == 0 \
        and not through_dispatcher() and library_available()


def quant_linear_fits(x: torch.Tensor, weights: LinearWeights) -> QuantLayout | None:
    """A quantized linear by the native kernels: its layout when they take it (format, input
    width a multiple of 128, group size, bf16 or float32 scales) for bf16 or float32 CPU input
    without autograd, else None. At most ``MAX_LINEAR_ROWS`` rows stream the weights
    (``quant_ops.quant_linear_rows``, which compiled graphs call as an op); more take
    ``quant_ops.quant_linear_many`` (products over weight panels or dequantized tiles),
    eagerly only."""
    if x.device.type != "cpu" or x.dtype not in KERNEL_DTYPES or _grad(x, weights.bias) or \
            (x.numel() // max(x.shape[-1], 1) > MAX_LINEAR_ROWS and
             torch.compiler.is_compiling()):
        return None
    return _supported_layout(weights, x.shape[-1])


def quant_gather_fits(ids: torch.Tensor, weights: LinearWeights, width: int,
                      dtype: torch.dtype) -> QuantLayout | None:
    """A quantized embedding's lookup of ``ids`` into ``dtype`` rows of ``width`` by the
    library (``quant_ops.quant_gather``): its layout when the kernels take it, for integer ids
    on the CPU, eagerly (a compiled graph keeps the torch reference), else None."""
    if ids.device.type != "cpu" or ids.dtype not in (torch.int64, torch.int32) or \
            dtype not in KERNEL_DTYPES or through_dispatcher() or not library_available():
        return None
    return _supported_layout(weights, width)


def _supported_layout(weights: LinearWeights, width: int) -> QuantLayout | None:
    """The kernels' layout of quantized ``weights`` of input ``width``, when they take it."""
    layout = quant_ops.quant_layout(weights, width)
    return layout if layout is not None and quant_ops.supported(layout) else None


def quant_step_fits(weights: LinearWeights, in_features: int) -> bool:
    """Whether the layer and model decode steps read this quantized linear."""
    return quant_step_code(weights, in_features) is not None


def quant_step_code(weights: LinearWeights, in_features: int) -> int | None:
    """The layer steps' code of this quantized linear's layout (format, scale dtype, group), or
    None when they do not read it."""
    layout = quant_ops.quant_layout(weights, in_features)
    return None if layout is None else quant_ops.step_code(layout)


def elementwise_fits(*tensors: torch.Tensor) -> bool:
    """The SwiGLU product or RMS norm in one pass: CPU tensors of one dtype (bf16 or
    float32), contiguous, no autograd."""
    first = tensors[0]
    return first.device.type == "cpu" and first.dtype in KERNEL_DTYPES and \
        not _grad(*tensors) and all(t.dtype == first.dtype and t.is_contiguous()
                                    for t in tensors) and library_available()


def decode_attention_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Decode attention over the cache in place: CPU, one dtype of bf16/float32, one query
    token, head_dim contiguous, no autograd."""
    return q.device.type == "cpu" and q.shape[1] == 1 and not _grad(q, k, v) and \
        q.dtype in KERNEL_DTYPES and k.dtype == v.dtype == q.dtype and \
        k.stride(-1) == 1 and v.stride(-1) == 1 and library_available()


def ssd_pool_fits(pool: torch.Tensor) -> bool:
    """The one-pass SSM step over this state pool (CPU, float32 or bf16, contiguous)."""
    return pool.device.type == "cpu" and pool.dtype in KERNEL_DTYPES \
        and pool.is_contiguous() and not pool.requires_grad and ssd_step_available()


def prefill_fits(zxbcdt: torch.Tensor, seq_idx: torch.Tensor | None,
                 params: tuple[torch.Tensor | None, ...], sizes: tuple[int, int, int, int]) -> bool:
    """The Mamba2 prefill kernels: CPU, float32 or bf16, no document ids, no autograd,
    ``sizes`` = (heads, head_dim, groups, d_state) with head_dim, d_state and d_inner/groups
    multiples of 16. Eager code under a dispatch mode (FlopCounterMode...) keeps the torch
    ops, which such modes can see into."""
    h, p, g, n = sizes
    return seq_idx is None and not _grad(zxbcdt, *params) and zxbcdt.device.type == "cpu" \
        and zxbcdt.dtype in KERNEL_DTYPES and zxbcdt.shape[1] > 0 and p % 16 == 0 \
        and n % 16 == 0 and (h * p // g) % 16 == 0 and prefill_available() \
        and (torch.compiler.is_compiling() or not is_in_torch_dispatch_mode())


MAX_CONV_KERNEL = 8


def conv_train_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The training conv + silu: float32 CPU input [B, L, D] with contiguous channels, D a
    multiple of 16, a kernel of at most ``MAX_CONV_KERNEL`` taps."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 3 \
        and x.stride(-1) == 1 and x.shape[-1] % 16 == 0 \
        and weight.shape == (x.shape[-1], weight.shape[-1]) \
        and 1 <= weight.shape[-1] <= MAX_CONV_KERNEL and conv_train_available()


def layer_fits(dtype: torch.dtype, dims: LayerDims) -> bool:
    """Whether layer_step.c takes a layer of these sizes in this dtype on this build."""
    return linear_available(dtype) and _layer_widths_fit(dtype, dims)


@functools.cache
def _layer_widths_fit(dtype: torch.dtype, dims: LayerDims) -> bool:
    width = 32 if dtype == torch.bfloat16 else 16
    widths = [dims.hidden, dims.ffn, dims.d_inner or dims.heads * dims.head_dim,
              dims.expert_ffn]
    return dtype in KERNEL_DTYPES and all(w % width == 0 for w in widths)


def layer_step_fits(x: torch.Tensor, norm_dtype: torch.dtype, dims: LayerDims) -> bool:
    """One decode token through a whole layer in one call: at most ``MAX_ROWS`` rows of eager
    CPU inference in the layer's dtype, no global forward hooks. Not inside torch.compile: a
    graph calls a custom op through the dispatcher (~0.1 ms a call), so compiled decode fuses
    the torch ops instead."""
    return x.shape[1] == 1 and x.shape[0] <= MAX_ROWS and x.device.type == "cpu" and \
        not torch.is_grad_enabled() and not torch.compiler.is_compiling() and \
        x.dtype == norm_dtype and layer_fits(x.dtype, dims) and not _global_hooks()


def decode_step_fits(x: torch.Tensor, cache: object, dims: tuple[LayerDims | None, ...]) -> bool:
    """Every layer of a decode token in one call: as ``layer_step_fits``, for a cache that
    addresses its keys by token rows, no dispatch mode, and no global forward hooks (the one
    call would skip the calls they see; hooks on the model's modules keep its plan from
    holding tensors)."""
    return hasattr(cache, "token_rows") and x.shape[1] == 1 and x.shape[0] <= MAX_ROWS and \
        x.device.type == "cpu" and not torch.is_grad_enabled() and \
        not torch.compiler.is_compiling() and not is_in_torch_dispatch_mode() and \
        all(layer_fits(x.dtype, d) for d in dims if d) and not _global_hooks()


def _global_hooks() -> bool:
    """Whether a forward hook registered for every module is in place."""
    module = torch.nn.modules.module
    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


def decode_rows(dtype: torch.dtype, device: torch.device, dims: tuple[LayerDims | None, ...],
                norm_dtypes: list[torch.dtype]) -> int:
    """How many rows a model's eager decode steps may run in one native call: ``MAX_ROWS``
    for a CPU model whose layers the kernels take in its dtype, else 0."""
    fits = device.type == "cpu" and all(layer_fits(dtype, d) for d in dims if d) and \
        all(d == dtype for d in norm_dtypes)
    return MAX_ROWS if fits else 0
