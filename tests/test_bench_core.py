"""benchmarks/bench_core.py measures bamba with its native kernels installed: the eager decode
goes through the whole-model native step (a run that measured the torch reference instead,
as this script did for a while after the kernels moved behind ``accelerate``, fails here)."""

import sys
from pathlib import Path

import pytest
import torch

from bamba.config import preset
from bamba.native import decode_ops, dispatch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_core  # noqa: E402


@pytest.mark.skipif(not dispatch.linear_available(torch.float32),
                    reason="the native decode step needs AVX-512 and a C compiler")
def test_bamba_side_decodes_through_the_native_step(tmp_path, monkeypatch) -> None:
    directory = tmp_path / "ckpt"
    bench_core.write_checkpoint(preset("tiny"), directory)
    calls = []
    real = decode_ops.decode_layers
    monkeypatch.setattr(decode_ops, "decode_layers",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    args = bench_core.parse_args(["--quick", "--dtypes", "float32"])
    ids = torch.randint(0, 100, (1, args.prompt))
    result = bench_core.bench_bamba(directory, torch.float32, args, ids, "none")
    assert result["decode_tok_s"] > 0
    assert len(calls) == 2 + args.decode * args.repeats  # warm-up and timed: every token
