"""bamba.cores: the thread plan as a pure function of (load, cores, requested threads), the load
read from /proc/stat, and the CLI choosing passive OpenMP waiting before torch loads."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bamba import cores


@pytest.mark.parametrize("busy, n_cores, requested, expected", [
    (0.0, 2, 2, cores.ThreadPlan(2, passive=False, oversubscribed=False)),  # idle
    (0.4, 2, 2, cores.ThreadPlan(2, passive=False, oversubscribed=False)),  # noise
    (1.0, 2, 2, cores.ThreadPlan(1, passive=True, oversubscribed=True)),  # one core taken
    (1.0, 2, 1, cores.ThreadPlan(1, passive=False, oversubscribed=False)),  # one asked, one free
    (2.0, 2, 2, cores.ThreadPlan(1, passive=True, oversubscribed=True)),  # all taken: one thread
    (5.0, 4, 4, cores.ThreadPlan(1, passive=True, oversubscribed=True)),  # more load than cores
    (2.2, 8, 8, cores.ThreadPlan(6, passive=True, oversubscribed=True)),
    (2.2, 8, 4, cores.ThreadPlan(4, passive=False, oversubscribed=False)),
    (-0.1, 2, 2, cores.ThreadPlan(2, passive=False, oversubscribed=False)),  # clock skew
])
def test_plan_threads(busy: float, n_cores: int, requested: int, expected) -> None:
    assert cores.plan_threads(busy, n_cores, requested) == expected


def test_plan_threads_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="requested"):
        cores.plan_threads(0.0, 2, 0)


def test_busy_cores_counts_only_our_cpus(tmp_path: Path) -> None:
    def stat(rows: list[tuple[int, int]]) -> Path:  # (busy user jiffies, idle jiffies) per cpu
        lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
        lines += [f"cpu{i} {u} 0 0 {idle} 0 0 0 0 0 0" for i, (u, idle) in enumerate(rows)]
        path = tmp_path / f"stat{len(list(tmp_path.iterdir()))}"
        path.write_text("\n".join([*lines, "intr 1 2 3", "ctxt 5"]) + "\n")
        return path

    before = cores.read_cpu_times(stat([(100, 100), (100, 100), (0, 0)]))
    after = cores.read_cpu_times(stat([(200, 100), (150, 150), (100, 0)]))
    assert cores.busy_cores(before, after, {0, 1}) == pytest.approx(1.5)
    assert cores.busy_cores(before, after, {0, 1, 2}) == pytest.approx(2.5)
    assert cores.busy_cores(before, before, {0}) == 0.0


def test_measure_load_on_this_machine() -> None:
    load = cores.measure_load(0.05)
    assert load is not None and load.cores >= 1 and 0.0 <= load.busy <= load.cores + 0.01


def _run(code: str, **env: str) -> str:
    import os

    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True, timeout=120,
                         env={**base, "BAMBA_ADAPT_THREADS": "1", **env}, capture_output=True,
                         text=True)
    return out.stdout + out.stderr


BUSY_MACHINE = """
    import os, sys
    from bamba import cores
    cores.measure_load = lambda seconds=0.25: cores.CoreLoad(busy=2.0, cores=2)
    prepare = cores.prepare
    def watched_prepare():
        print("torch loaded at prepare:", "torch" in sys.modules)
        return prepare()
    cores.prepare = watched_prepare
    import bamba.cli.train as train_cli
    def fake_run(args):  # what the train verb sees, without training
        import torch
        print("wait policy:", os.environ.get("OMP_WAIT_POLICY"),
              "threads:", cores.choose_threads(2))
        return 0
    train_cli.run = fake_run
    from bamba.cli import main
    sys.exit(main(["train", "configs/tiny-demo.yaml"]))
"""


def test_cli_chooses_passive_waiting_before_torch_loads() -> None:
    out = _run(BUSY_MACHINE)
    assert "torch loaded at prepare: False" in out and "wait policy: passive threads: 1" in out
    assert out.count("other processes keep 2.0 of the 2 cores busy: using 1 thread instead of 2"
                     ", OpenMP waiting passive") == 1


def test_opt_out_and_user_wait_policy_are_kept() -> None:
    assert "wait policy: None threads: 2" in _run(BUSY_MACHINE, BAMBA_ADAPT_THREADS="0")
    assert "wait policy: active threads: 1" in _run(BUSY_MACHINE, OMP_WAIT_POLICY="active")


INFERENCE_ON_A_BUSY_MACHINE = """
    import sys
    from bamba import cores
    cores.measure_load = lambda seconds=0.25: cores.CoreLoad(busy=2.0, cores=2)
    from bamba.cli.inference_options import set_threads
    import torch
    set_threads(None)
    print("threads:", torch.get_num_threads())
    set_threads(2)
    print("threads:", torch.get_num_threads())
"""


def test_generate_chat_and_serve_threads_adapt_to_a_busy_machine() -> None:
    from bamba.cli import ADAPTS_THREADS

    assert {"generate", "chat", "serve"} <= ADAPTS_THREADS
    out = _run(INFERENCE_ON_A_BUSY_MACHINE)
    assert out.count("threads: 1") == 2 and "using 1 thread instead of 2" in out


def test_in_passing_thread_returns_and_raises_from_a_thread_that_ends():
    import threading

    from bamba.cores import in_passing_thread

    seen = []
    assert in_passing_thread(lambda: seen.append(threading.current_thread()) or 7) == 7
    assert seen[0] is not threading.main_thread() and not seen[0].is_alive()
    with pytest.raises(ValueError, match="bad"):
        in_passing_thread(lambda: (_ for _ in ()).throw(ValueError("bad")))
