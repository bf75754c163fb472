"""The one shared library of the native kernels: built on first use with the system C compiler
into ``$BAMBA_CACHE`` (default ``~/.cache/bamba``)/kernels, once per source and machine, written
atomically, and loaded with ctypes. ``load()`` returns it with every function's signature set,
or None without a C compiler or with ``BAMBA_NATIVE=0`` (callers then keep the torch path)."""

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

log = logging.getLogger(__name__)

SOURCES = tuple(sorted(Path(__file__).parent.glob("*.[ch]")))  # kernels and shared headers
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared")

_I32, _I64, _PTR, _F32 = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
_LINEAR = [_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I32]
# name -> (argument types, result type) of every exported function
SIGNATURES: dict[str, tuple[list | None, type | None]] = {
    "bamba_ssd_step_pool": ([_PTR, _I32, _PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _PTR, _PTR,
                             _PTR, _PTR, _PTR, _I32], _I32),
    "bamba_linear_bf16": (_LINEAR, _I32),
    "bamba_linear_f32": (_LINEAR, _I32),
    "bamba_linear_supported": (None, _I32),
    "bamba_quant_linear": ([_PTR, _I32, _PTR, _I32, _PTR, _I32, _I64, _I64, _PTR, _PTR, _I64,
                            _I64, _I64, _I32], _I32),
    "bamba_quant_gemm": ([_PTR, _I32, _PTR, _I32, _PTR, _I32, _I64, _I64, _PTR, _PTR, _I64,
                          _I64, _I64, _I32], _I32),
    "bamba_quant_supported": ([_I32, _I64, _I64], _I32),
    "bamba_quant_set_int8_activations": ([_I32], _I32),
    "bamba_quant_dequantize": ([_PTR, _I32, _PTR, _I32, _I64, _I64, _I64, _I64, _I64, _PTR,
                                _I32, _I32], None),
    "bamba_quant_gather": ([_PTR, _I32, _PTR, _I32, _I64, _I64, _I64, _PTR, _I64, _I64, _PTR,
                            _I32], _I32),
    "bamba_mamba_layer_step": ([_PTR, _PTR, _I32, _I64, _I64, _F32, _F32, _F32, _F32, _PTR,
                                _PTR, _I64, _PTR, _I32, _PTR, _I32, _PTR, _I32], _I32),
    "bamba_attention_in_step": ([_PTR, _PTR, _I32, _I64, _I64, _F32, _PTR, _PTR, _I64, _I32],
                                _I32),
    "bamba_attention_out_step": ([_PTR, _PTR, _I32, _I64, _I64, _F32, _F32, _PTR, _PTR, _PTR,
                                  _I64, _I32], _I32),
    "bamba_decode_layers": ([_PTR, _PTR, _PTR, _PTR, _PTR, _I32], _I32),
    "bamba_decode_attention": ([_PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64,
                                _PTR, _PTR, _I32, _F32, _I32], _I32),
    "bamba_silu_mul": ([_PTR, _PTR, _PTR, _I64, _I32, _I32], None),
    "bamba_rms_norm": ([_PTR, _PTR, _PTR, _I64, _I64, _F32, _I32, _I32], _I32),
    "bamba_prefill_supported": (None, _I32),
    "bamba_prefill_conv": ([_PTR, _I32, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _PTR, _PTR,
                            _PTR, _PTR, _F32, _F32, _PTR, _PTR, _PTR, _I32], _I32),
    "bamba_prefill_scan": ([_PTR, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _PTR, _PTR, _PTR,
                            _I32, _PTR, _I64, _I32, _I32], _I32),
    "bamba_prefill_gate_norm": ([_PTR, _PTR, _I64, _PTR, _I32, _I64, _I64, _I64, _I64, _I64,
                                 _PTR, _PTR, _F32, _PTR, _I32, _I32], _I32),
    "bamba_conv_train_supported": (None, _I32),
    "bamba_conv_silu_fwd": ([_PTR, _I64, _I64, _I64, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR,
                             _I32], _I32),
    "bamba_conv_silu_bwd": ([_PTR, _I64, _I64, _I64, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR,
                             _PTR, _PTR, _PTR, _I32], _I32),
}


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
def load() -> ctypes.CDLL | None:
    """The built library with its functions' signatures set, or None (no compiler, a failed
    build, or ``BAMBA_NATIVE=0``; ``load.cache_clear()`` makes the next call look again)."""
    if os.environ.get("BAMBA_NATIVE", "1") == "0":
        return None
    try:
        return open_library(build())
    except (RuntimeError, OSError) as err:
        log.warning("native kernels unavailable, using torch ops: %s", err)
        return None


def open_library(path: Path) -> ctypes.CDLL:
    """A built library loaded, its functions' signatures set (OSError if it will not load)."""
    lib = ctypes.CDLL(str(path))
    for name, (argtypes, restype) in SIGNATURES.items():
        function = getattr(lib, name)
        if argtypes is not None:
            function.argtypes = argtypes
        function.restype = restype
    return lib
