"""Native CPU kernels, compiled on first use with the system C compiler and loaded with ctypes.

``ssd_step.c`` advances a batch of Mamba2 SSM states by one token in one pass over each state
(read once, written once), which bounds a batched decode step on a CPU; the same update in
torch ops reads and writes the state several times. It is exposed as the torch operator
``torch.ops.bamba.ssd_step_pool`` (it mutates the pool), so eager code and torch.compile graphs
call it alike.

The shared library is built once per source and machine into ``$BAMBA_CACHE`` (default
``~/.cache/bamba``)/kernels, written atomically. Without a C compiler, or with
``BAMBA_NATIVE=0``, ``ssd_step_available()`` is False and callers use the pure torch path
(``bamba.ops.ssd.ssd_step``), which tests hold the kernel equal to.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("ssd_step.c")
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fPIC", "-shared", "-pthread")


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


def build(source: Path = SOURCE) -> Path:
    """Compile ``source`` into a shared library in the cache (once per source, flags and
    machine); return its path. Raises RuntimeError if no compiler is found or it fails."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC)")
    text = source.read_bytes()
    key = hashlib.sha256(text + " ".join(FLAGS).encode() + _machine_key().encode()).hexdigest()
    target = cache_dir() / f"{source.stem}-{key[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        result = subprocess.run([compiler, *FLAGS, str(source), "-o", str(partial), "-lm"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {source.name} failed: {result.stderr.strip()[:500]}")
        os.replace(partial, target)
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("BAMBA_NATIVE", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError) as err:
        log.warning("native SSD kernel unavailable, using torch ops: %s", err)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.bamba_ssd_step_pool.argtypes = [ptr, ctypes.c_int, ptr, i64, i64, i64, i64, i64,
                                        ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_int]
    lib.bamba_ssd_step_pool.restype = ctypes.c_int
    return lib


@torch.compiler.assume_constant_result  # a compiled graph bakes in the answer, not the build
def ssd_step_available() -> bool:
    """True when the native kernel is built and loaded (and not disabled by BAMBA_NATIVE=0)."""
    return _library() is not None


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
