"""benchmarks/bench_train.py --quick: every row measured, the plain loop in its own process.

Run as a subprocess: the benchmark changes its process's allocator (``retain_freed_memory``),
which must not leak into the test process.
"""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"


def test_quick_run_measures_every_row_with_the_plain_loop_apart(tmp_path) -> None:
    out = tmp_path / "train.json"
    subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--output", str(out)],
                   check=True, capture_output=True, text=True, timeout=600)
    demo = json.loads(out.read_text())["cases"]["demo"]
    rows = ("bamba", "transformers", "transformers, retained memory")
    assert all(demo[r]["tokens_per_s"] > 0 and len(demo[r]["samples"]) == 1 for r in rows)
    assert demo["transformers"]["speedup"] == 1.0
    assert "child process" in demo["transformers"]["process"]
    assert demo["speedup"] == demo["bamba"]["tokens_per_s"] / demo["transformers"]["tokens_per_s"]


PARTS = SCRIPT.with_name("bench_train_parts.py")


def test_parts_benchmark_times_both_implementations_of_each_part(tmp_path) -> None:
    out = tmp_path / "parts.json"
    subprocess.run([sys.executable, str(PARTS), "--repeats", "1", "--threads", "1",
                    "--output", str(out)], check=True, capture_output=True, text=True,
                   timeout=600)
    report = json.loads(out.read_text())
    assert set(report["conv"]) == {"demo", "bench"}
    assert all(set(r["ms"]) == {"native op", "torch ops"} and min(r["ms"].values()) > 0
               for r in report["conv"].values())
    assert all(set(r["ms"]) == {"matmul", "flash"} for r in report["attention"].values())


def test_bamba_side_trains_with_the_native_kernels_installed(monkeypatch) -> None:
    """As the trainer's build_model: the model is accelerated (the native training conv)."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import bench_train  # importing changes nothing: main() sets the allocator

    _, ours, _ = bench_train.build_pair("demo")
    assert bench_train.is_accelerated(ours)
