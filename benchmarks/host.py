"""The host beside every figure: its measured matmul peak and memory read bandwidth.

Hosts of one machine kind differ (a bf16 2048³ matmul reached 0.41 TFLOP/s on one and 0.9 on
another), so a figure is only comparable with the rate its own host reached. Every benchmark
records ``describe_host()`` in its JSON, measured in the same process at the same thread count.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch


def matmul_tflops(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """The best rate of a size³ matmul in ``dtype`` over ``repeats`` tries (after a warm-up)."""
    a, b = (torch.randn(size, size).to(dtype) for _ in range(2))
    torch.mm(a, b)
    best = min(_seconds(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * size ** 3 / best / 1e12


def read_gb_per_s(megabytes: int = 1024, repeats: int = 5) -> float:
    """The best rate of one pass of reads over a buffer far larger than the caches (a sum)."""
    data = torch.ones(megabytes * 2 ** 20 // 4, dtype=torch.float32)
    data.sum()
    best = min(_seconds(data.sum) for _ in range(repeats))
    return data.nbytes / best / 1e9


def describe_host(quick: bool = False) -> dict:
    """What this host reached just now, at torch's current thread count; ``quick`` uses small
    sizes (smoke tests: the figures then say little)."""
    size, megabytes = (256, 64) if quick else (2048, 1024)
    return {"cpu": _cpu_name(), "logical_cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(),
            "bf16_matmul_tflops": round(matmul_tflops(torch.bfloat16, size), 3),
            "fp32_matmul_tflops": round(matmul_tflops(torch.float32, size), 3),
            "read_gb_per_s": round(read_gb_per_s(megabytes), 1),
            "matmul_size": size, "read_megabytes": megabytes,
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as JSON atomically (a temp file in the same directory, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _seconds(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor()
