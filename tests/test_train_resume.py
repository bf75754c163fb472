"""Training faults: exact resume in a new process, SIGKILL, a kill during a checkpoint write,
torchrun with 2 processes, and a 2-process checkpoint resumed at 1 process.

Every run is a subprocess (``python -m bamba.train`` or ``torchrun``) on a 4-layer hybrid with
one thread per process; losses are read back from the run's metrics.jsonl (last line per step).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from bamba.train.dcp_checkpoint import TRAIN_STATE, complete_checkpoints
from bamba.train.metrics import read_metrics

CONFIG = dict(
    model="tiny",
    model_overrides=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=32,
                         mamba_d_state=16, mamba_chunk_size=16, vocab_size=256,
                         num_attention_heads=4, num_key_value_heads=2),
    seq_len=64, batch_size=2, grad_accum=2, steps=12, lr=3e-3, warmup_steps=2, ckpt_every=3,
    keep_last=2, z_loss=1e-4, progress=False, export=False, threads=1,
)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TOL = 1e-6


def write_config(directory: Path, **changes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "out_dir": str(directory / "run"), **changes}))
    return path


def command(config: Path, *overrides: str, nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "bamba.train", str(config), *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "bamba.train", str(config), *overrides]


def run(config: Path, *overrides: str, nproc: int = 1) -> None:
    done = subprocess.run(command(config, *overrides, nproc=nproc), env=ENV, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]


def run_and_kill(config: Path, after_step: int, nproc: int = 1) -> None:
    """Start a run and SIGKILL it (its whole process group) once ``after_step`` is logged."""
    metrics = config.parent / "run" / "metrics.jsonl"
    proc = subprocess.Popen(command(config, nproc=nproc), env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and max(read_metrics(metrics), default=0) >= after_step:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
    assert max(read_metrics(metrics)) < CONFIG["steps"]  # killed before the end


def losses(config: Path) -> dict[int, float]:
    return {step: r["loss"] for step, r in read_metrics(config.parent / "run" / "metrics.jsonl").items()}


def assert_same_losses(got: dict[int, float], want: dict[int, float], tol: float = TOL) -> None:
    assert sorted(got) == sorted(want)
    for step in want:
        assert abs(got[step] - want[step]) <= tol, (step, got[step], want[step])


def data_rows(checkpoint: Path) -> list[int]:
    state = torch.load(checkpoint / TRAIN_STATE, weights_only=True)
    return [rank["data"]["rows"] for rank in state["ranks"]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """Losses of an uninterrupted 12-step run in one process."""
    config = write_config(tmp_path_factory.mktemp("reference"))
    run(config)
    got = losses(config)
    assert sorted(got) == list(range(1, 13))
    assert got[12] < got[1]  # it learns
    return got


def test_resume_in_new_process_is_exact(reference, tmp_path: Path) -> None:
    """(a) Stop after 5 steps (same schedule), restart a new process: identical losses."""
    config = write_config(tmp_path)
    run(config, "--steps=5", "--decay_steps=12")
    assert [s for s, _ in complete_checkpoints(tmp_path / "run" / "checkpoints")] == [3, 5]
    run(config)
    assert_same_losses(losses(config), reference)


def test_sigkill_then_resume_is_exact(reference, tmp_path: Path) -> None:
    """(c) SIGKILL after step 7 (newest checkpoint: 6); the restart redoes 7.. identically."""
    config = write_config(tmp_path)
    run_and_kill(config, after_step=7)
    run(config)
    assert_same_losses(losses(config), reference)
    final = complete_checkpoints(tmp_path / "run" / "checkpoints")[-1][1]
    assert data_rows(final) == [12 * 2 * 2]  # steps x micro-batches x rows: none re-read


def test_sigterm_checkpoints_then_resume_is_exact(reference, tmp_path: Path) -> None:
    """Preemption: SIGTERM makes the run finish its step, checkpoint it and exit cleanly."""
    config = write_config(tmp_path, ckpt_every=0)
    metrics = tmp_path / "run" / "metrics.jsonl"
    proc = subprocess.Popen(command(config), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not (metrics.exists() and read_metrics(metrics)):
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped at step" in err
    [(step, _)] = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert step == max(read_metrics(metrics)) < CONFIG["steps"]
    run(config)
    assert_same_losses(losses(config), reference)


KILL_IN_SAVE = """
import os, signal, sys
from bamba.train.dcp_checkpoint import Checkpointer
from bamba.train.__main__ import main

publish = Checkpointer._publish
def die_before_rename(self, tmp, final):
    if final.name == "step_00000006":
        os.kill(os.getpid(), signal.SIGKILL)
    publish(self, tmp, final)
Checkpointer._publish = die_before_rename
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_checkpoint_write_keeps_previous(reference, tmp_path: Path) -> None:
    """(d) Killed with every shard of step 6 written but not published: resume from step 3."""
    config = write_config(tmp_path)
    proc = subprocess.run([sys.executable, "-c", KILL_IN_SAVE, str(config)], env=ENV,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "step_00000006.tmp" / ".metadata").is_file()
    assert [s for s, _ in complete_checkpoints(checkpoints)] == [3]
    run(config)
    assert_same_losses(losses(config), reference)
    assert not (checkpoints / "step_00000006.tmp").exists()


def test_two_processes_sigkill_resume_and_rescale_to_one(tmp_path: Path) -> None:
    """(b) torchrun x2 killed with SIGKILL then resumed: same losses as uninterrupted.
    (e) The 2-process checkpoint resumed in 1 process (same global batch) continues the same
    data stream and, up to float reduction order, the same losses."""
    changes = dict(steps=8, ckpt_every=4, grad_accum=1)
    ref_config = write_config(tmp_path / "ref", **changes)
    run(ref_config, nproc=2)
    want = losses(ref_config)
    assert sorted(want) == list(range(1, 9))

    config = write_config(tmp_path / "killed", **changes)
    run_and_kill(config, after_step=5, nproc=2)
    shutil.copytree(tmp_path / "killed", tmp_path / "one", symlinks=True)
    run(config, nproc=2)
    assert_same_losses(losses(config), want)

    one = tmp_path / "one" / "config.yaml"
    one.write_text(yaml.safe_dump({**yaml.safe_load(one.read_text()),
                                   "out_dir": str(tmp_path / "one" / "run")}))
    run(one, "--batch_size=4")  # 1 process x 4 rows = 2 processes x 2 rows
    got = losses(one)
    assert_same_losses(got, want, tol=2e-3)
    final = complete_checkpoints(tmp_path / "one" / "run" / "checkpoints")[-1][1]
    assert data_rows(final) == [8 * 4]  # every global row read exactly once


def test_fsdp_two_processes_match_one_process(tmp_path: Path) -> None:
    """FSDP2 x2 with 2 micro-batches of 1 row = 1 process with 2 micro-batches of 2 rows (the
    same rows): sharded gradients, accumulation without sync, global token weighting (fp32)."""
    changes = dict(steps=4, ckpt_every=0, bf16=False, grad_accum=2)
    two = write_config(tmp_path / "two", batch_size=1, **changes)
    one = write_config(tmp_path / "one", batch_size=2, **changes)
    run(two, nproc=2)
    run(one)
    assert_same_losses(losses(two), losses(one), tol=1e-5)
