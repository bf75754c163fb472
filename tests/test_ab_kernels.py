"""benchmarks/ab_kernels.py at its smallest: both builds load, the turns alternate between
them and the real loader comes back; a revision without kernels is refused. Nothing timed."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import ab_kernels  # noqa: E402
from bamba.native import dispatch, library  # noqa: E402
from serve_helpers import save_tiny_checkpoint  # noqa: E402

pytestmark = pytest.mark.skipif(not dispatch.linear_available(torch.bfloat16),
                                reason="no bf16 kernels on this CPU")


@pytest.mark.parametrize("measure", [["--batch", "2"], ["--prefill", "16"]])
def test_two_builds_take_turns(tmp_path: Path, capsys: pytest.CaptureFixture,
                               monkeypatch: pytest.MonkeyPatch, measure: list[str]) -> None:
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt")
    used = []
    real_open = library.open_library

    def opened(path: Path):  # a build that notes each kernel its callers look up
        lib = real_open(path)

        class Noted:  # one a build, even when both builds are the same file (a clean tree)
            def __getattr__(self, name: str):
                used.append(self)
                return getattr(lib, name)

        return Noted()

    monkeypatch.setattr(library, "open_library", opened)
    real_load = library.load
    assert ab_kernels.main([str(checkpoint), "--turns", "2", "--steps", "3", *measure]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["checkpoint"] == str(checkpoint) and row["base_ms"] > 0 and row["tree_ms"] > 0
    assert row[measure[0].removeprefix("--")] == int(measure[1])
    runs = [build for i, build in enumerate(used) if i == 0 or used[i - 1] is not build]
    assert len(runs) == 3 and runs[0] is runs[2] is not runs[1]  # base, tree; tree, base
    assert library.load is real_load


def test_a_revision_without_kernels_is_refused(tmp_path: Path) -> None:
    first = ab_kernels.subprocess.run(["git", "-C", str(ab_kernels.ROOT), "rev-list",
                                       "--max-parents=0", "HEAD"], capture_output=True,
                                      text=True, check=True).stdout.split()[0]
    with pytest.raises(ValueError, match="no kernel sources"):
        ab_kernels.revision_sources(first, tmp_path)
