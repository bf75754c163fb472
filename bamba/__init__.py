"""bamba: hybrid Mamba2/attention language models, from checkpoint to serving and training.

The top-level names load lazily so ``import bamba`` stays light.
"""

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "BambaConfig": "bamba.config",
    "BambaLM": "bamba.model",
    "from_pretrained": "bamba.checkpoint",
    "load_tokenizer": "bamba.checkpoint",
    "generate": "bamba.generation",
    "GenerationConfig": "bamba.generation",
    "LLM": "bamba.engine",
    "SamplingParams": "bamba.engine",
    "StructuredOutputsParams": "bamba.engine",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bamba' has no attribute {name!r}")
