"""The one dtype parser of the package: names a user may give for weights and states.

Only float32 and bfloat16: the native kernels (linear, attention, layer steps, SSM state) take
exactly these two; float16 would fall back to slow torch paths on a CPU, so it is refused
everywhere rather than accepted and slow. bfloat16 is the default of every inference verb
(``generate``, ``chat``, ``serve``): half the bytes of float32 to stream per decoded token.
torch is imported only when a name is parsed, so option definitions stay light.
"""

from __future__ import annotations

from typing import Any

# accepted name -> canonical name (a torch dtype attribute)
DTYPE_NAMES: dict[str, str] = {"float32": "float32", "fp32": "float32",
                               "bfloat16": "bfloat16", "bf16": "bfloat16"}
DEFAULT_DTYPE = "bfloat16"
DTYPE_HELP = "float32 (fp32) or bfloat16 (bf16); float16 has no fast kernels and is refused"


def dtype_name(value: Any, name: str = "dtype") -> str:
    """The canonical name ("float32" or "bfloat16") of an accepted name or torch dtype;
    ValueError naming ``name`` otherwise."""
    canonical = DTYPE_NAMES.get(str(value).removeprefix("torch.").strip().lower())
    if canonical is None:
        raise ValueError(f"{name} {str(value)!r} is not one of {', '.join(DTYPE_NAMES)}")
    return canonical


def parse_dtype(value: Any, name: str = "dtype") -> Any:
    """The torch dtype for an accepted name (or a supported torch dtype)."""
    import torch

    if not isinstance(value, (str, torch.dtype)):
        raise ValueError(f"{name} must be a dtype name, got {type(value).__name__}")
    return getattr(torch, dtype_name(value, name))
