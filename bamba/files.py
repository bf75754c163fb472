"""File modes for atomic writes: a temporary file or directory (``mkstemp`` 0600, ``mkdtemp``
0700, safetensors 0600) renamed into place should end with the mode a plain ``open`` or
``mkdir`` would have given it, i.e. 0666 / 0777 less the umask (0644 / 0755 under umask 022)."""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it (Linux); elsewhere set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_mode(directory: bool = False) -> int:
    """The mode ``open``/``mkdir`` would give a new file or directory under the umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def give_plain_modes(root: Path) -> None:
    """chmod ``root`` (a file or a directory and everything in it) to ``plain_mode``."""
    root = Path(root)
    if root.is_dir():
        for path in root.rglob("*"):
            os.chmod(path, plain_mode(path.is_dir()))
    os.chmod(root, plain_mode(root.is_dir()))
