"""Files written atomically (temp file or directory, then rename) get the modes a plain create
would: 0644 / 0755 under umask 022, tighter under a tighter umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from bamba.checkpoint import save_pretrained
from bamba.config import preset
from bamba.data.shards import write_json
from bamba.model import BambaLM

from test_train_units import SMALL


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=[0o022, 0o077])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def test_exported_checkpoint_has_plain_modes(umask: int, tmp_path: Path) -> None:
    target = save_pretrained(BambaLM(preset("tiny", **SMALL)), tmp_path / "hf")
    assert _mode(target) == 0o777 & ~umask
    files = list(target.iterdir())
    assert {p.name for p in files} >= {"model.safetensors", "config.json"}
    for path in files:
        assert _mode(path) == 0o666 & ~umask, path.name
    save_pretrained(BambaLM(preset("tiny", **SMALL)), target)  # into an existing directory
    assert _mode(target / "model.safetensors") == 0o666 & ~umask


def test_manifest_written_atomically_has_a_plain_mode(umask: int, tmp_path: Path) -> None:
    write_json(tmp_path / "manifest.json", {"a": 1})
    assert _mode(tmp_path / "manifest.json") == 0o666 & ~umask
