"""When a native kernel's Python wrapper calls its registered torch op instead of the library."""

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode


def through_dispatcher() -> bool:
    """Inside torch.compile (a graph can only hold ops), or under a dispatch mode such as
    FlopCounterMode that must see the op. Otherwise eager callers go to the library directly:
    a Python custom op costs ~0.1 ms a call through the dispatcher."""
    return torch.compiler.is_compiling() or is_in_torch_dispatch_mode()
