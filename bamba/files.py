"""Files: the modes of atomic writes, and reading a JSON object.

A temporary file or directory (``mkstemp`` 0600, ``mkdtemp`` 0700, safetensors 0600) renamed
into place should end with the mode a plain ``open`` or ``mkdir`` would have given it, i.e.
0666 / 0777 less the umask (0644 / 0755 under umask 022)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object a file holds; one ValueError line naming the file when it is not UTF-8,
    not valid JSON, or holds something else."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return raw


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
