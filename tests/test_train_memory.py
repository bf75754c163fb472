"""bamba.train.memory: after ``retain_freed_memory`` a freed block is reused, not faulted in anew.

Each check runs in a fresh interpreter: the setting is process-wide and must not leak into the
test process.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

PROBE = """
import json, resource, sys, torch
from bamba.train.memory import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else None
def step():
    t = torch.empty(48 << 20, dtype=torch.uint8)  # 48 MiB: above glibc's largest mmap threshold
    t.fill_(1)  # touch every page
    return int(t[-1])
for _ in range(10):  # glibc's aligned blocks settle into reusable free chunks
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults": faults, "again": retain_freed_memory()}))
"""


def probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_retained_memory_is_reused_without_page_faults() -> None:
    default, retained = probe("default"), probe("retain")
    pages = 5 * (48 << 20) // 4096
    assert default["faults"] > pages // 2  # glibc maps and unmaps the block every time
    assert retained["applied"] is True and retained["again"] is True
    assert retained["faults"] < pages // 50  # the freed heap block is reused


def test_train_config_keeps_memory_by_default() -> None:
    from bamba.train.train_config import TrainConfig

    assert TrainConfig().retain_memory is True
    assert TrainConfig(retain_memory=False).retain_memory is False
