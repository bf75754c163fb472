"""Native CPU kernels, compiled on first use with the system C compiler and loaded with ctypes.

``ssd_step.c`` advances a batch of Mamba2 SSM states by one token in one pass over each state
(read once, written once), which bounds a batched decode step on a CPU; the same update in
torch ops reads and writes the state several times. It is exposed as the torch operator
``torch.ops.bamba.ssd_step_pool`` (it mutates the pool), so eager code and torch.compile graphs
call it alike. ``linear.c`` is a linear layer for 1-8 rows (decode) in bf16 (AVX-512 BF16) or
float32 (AVX-512) that streams the weights once: ``torch.ops.bamba.linear_rows``.
``layer_step.c`` runs a whole decoder layer for one decode token, a few rows at a time, in one
OpenMP region (``layer_ops``), and every layer of a model in one call (``decode_ops``: rope,
the cache write and attention included); ``attention_step.c`` is decode attention over keys and values in
place (``attention_ops``); ``mixer_prefill.c`` is the Mamba2 mixer's prefill between the
projections, chunked scan included (``prefill_ops``); ``elementwise.c`` the SwiGLU product and
RMS norm of a prefill in one pass each (``elementwise_ops``); ``conv_train.c`` the mixer's causal
conv + silu and its backward, with document resets, for training (``train_ops``).

The shared library is built once per source and machine into ``$BAMBA_CACHE`` (default
``~/.cache/bamba``)/kernels, written atomically. Without a C compiler, or with
``BAMBA_NATIVE=0``, ``ssd_step_available()`` and ``linear_available()`` are False and callers
use the torch path (``bamba.ops.ssd.ssd_step``, ``F.linear``), which tests hold the kernels
equal to.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch.utils.flop_counter import register_flop_formula

from bamba.native import attention_ops, decode_ops, elementwise_ops, layer_ops, train_ops

log = logging.getLogger(__name__)

SOURCES = tuple(sorted(Path(__file__).parent.glob("*.[ch]")))  # kernels and shared headers
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared")


def cache_dir() -> Path:
    return Path(os.environ.get("BAMBA_CACHE", Path.home() / ".cache" / "bamba")) / "kernels"


def _machine_key() -> str:
    """What a -march=native build depends on: the CPU model and architecture."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{platform.machine()} {model.strip()}"


def build(sources: tuple[Path, ...] = SOURCES) -> Path:
    """Compile the C ``sources`` into one shared library in the cache (once per sources,
    flags and machine); return its path. Raises RuntimeError if no compiler is found or it
    fails."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC)")
    digest = hashlib.sha256(" ".join(FLAGS).encode() + _machine_key().encode())
    for source in sources:
        digest.update(source.name.encode() + source.read_bytes())
    target = cache_dir() / f"kernels-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        units = [str(s) for s in sources if s.suffix == ".c"]
        result = subprocess.run([compiler, *FLAGS, *units, "-o", str(partial), "-lm"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {', '.join(Path(u).name for u in units)} failed: "
                               f"{result.stderr.strip()[:500]}")
        os.replace(partial, target)
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("BAMBA_NATIVE", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError) as err:
        log.warning("native kernels unavailable, using torch ops: %s", err)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.bamba_ssd_step_pool.argtypes = [ptr, ctypes.c_int, ptr, i64, i64, i64, i64, i64,
                                        ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_int]
    lib.bamba_ssd_step_pool.restype = ctypes.c_int
    for name in ("bamba_linear_bf16", "bamba_linear_f32"):
        getattr(lib, name).argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
        getattr(lib, name).restype = ctypes.c_int
    lib.bamba_linear_supported.restype = ctypes.c_int
    layer_ops.declare(lib)
    attention_ops.declare(lib)
    decode_ops.declare(lib)
    elementwise_ops.declare(lib)
    train_ops.declare(lib)
    return lib


@torch.compiler.assume_constant_result  # a compiled graph bakes in the answer, not the build
def library_available() -> bool:
    """True when the native library is built and loaded (and not disabled by BAMBA_NATIVE=0)."""
    return _library() is not None


def ssd_step_available() -> bool:
    """True when the one-pass SSM step kernel can run (it is in every build of the library)."""
    return library_available()


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


@torch.library.custom_op("bamba::ssd_step_pool", mutates_args=("pool",), device_types="cpu")
def ssd_step_pool(pool: torch.Tensor, rows: torch.Tensor, x: torch.Tensor, dt: torch.Tensor,
                  A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Advance ``pool[rows]`` ([S, H, P, N], float32 or bfloat16, contiguous) by one token in
    place; x [B, H, P], dt [B, H] (softplus'ed), A [H], B and C [B, G, N]. Returns y [B, H, P]
    float32 (before the D skip). Same contract as ``bamba.ops.ssd.ssd_step``."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the native SSD kernel is unavailable (see ssd_step_available())")
    s, h, p, n = pool.shape
    b, g = x.shape[0], B.shape[1]
    if pool.dtype not in (torch.float32, torch.bfloat16) or not pool.is_contiguous():
        raise ValueError(f"state pool must be contiguous float32 or bfloat16, got {pool.dtype}")
    if x.shape != (b, h, p) or dt.shape != (b, h) or B.shape != (b, g, n) or \
            C.shape != (b, g, n) or A.shape != (h,) or rows.shape != (b,) or h % g:
        raise ValueError("ssd_step_pool: inconsistent shapes")
    rows = rows.to(torch.int64).contiguous()
    if b and (int(rows.min()) < 0 or int(rows.max()) >= s):
        raise ValueError(f"ssd_step_pool: rows must lie in [0, {s})")
    x, dt, A, B, C = (_f32(t) for t in (x, dt, A, B, C))
    y = torch.empty(b, h, p, dtype=torch.float32)
    lib.bamba_ssd_step_pool(pool.data_ptr(), int(pool.dtype == torch.bfloat16), rows.data_ptr(),
                            b, h, p, n, g, x.data_ptr(), dt.data_ptr(), A.data_ptr(),
                            B.data_ptr(), C.data_ptr(), y.data_ptr(), torch.get_num_threads())
    return y


@ssd_step_pool.register_fake
def _(pool, rows, x, dt, A, B, C):
    return x.new_empty(x.shape, dtype=torch.float32)


MAX_LINEAR_ROWS = 8  # beyond, oneDNN's matmul catches up (few-row kernels are bandwidth-bound)
# dtype -> (bit of bamba_linear_supported, input width multiple, C function)
_LINEAR = {torch.bfloat16: (1, 32, "bamba_linear_bf16"), torch.float32: (2, 16, "bamba_linear_f32")}


@torch.compiler.assume_constant_result
def linear_available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """True when the few-row linear kernel for ``dtype`` is built for this CPU (bf16 needs
    AVX-512 BF16, float32 AVX-512)."""
    lib = _library()
    return lib is not None and dtype in _LINEAR and \
        bool(lib.bamba_linear_supported() & _LINEAR[dtype][0])


def use_linear_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear_rows`` serves x @ weight.T: bf16 or float32 CPU tensors of one dtype
    without autograd, at most ``MAX_LINEAR_ROWS`` rows, an input width the kernel's vectors
    divide, the kernel built."""
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return x.dtype == weight.dtype and x.dtype in _LINEAR and x.device.type == "cpu" \
        and not grad and weight.is_contiguous() \
        and x.numel() // x.shape[-1] <= MAX_LINEAR_ROWS \
        and x.shape[-1] % _LINEAR[x.dtype][1] == 0 and linear_available(x.dtype)


@torch.library.custom_op("bamba::linear_rows", mutates_args=(), device_types="cpu")
def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ weight.T (+ bias) for a few rows (see ``use_linear_kernel``), streaming the
    weight once with float32 accumulation. Same contract as ``F.linear``."""
    lib = _library()
    k, n = x.shape[-1], weight.shape[0]
    rows = x.reshape(-1, k).contiguous()
    if weight.shape != (n, k) or (bias is not None and bias.shape != (n,)) or \
            weight.dtype != x.dtype:
        raise ValueError(f"linear_rows: weight {tuple(weight.shape)} {weight.dtype} does not "
                         f"match input width {k} {x.dtype}")
    y = torch.empty(rows.shape[0], n, dtype=x.dtype)
    bias_ptr = None if bias is None else bias.to(x.dtype).contiguous().data_ptr()
    fn = None if lib is None or x.dtype not in _LINEAR else getattr(lib, _LINEAR[x.dtype][2])
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
