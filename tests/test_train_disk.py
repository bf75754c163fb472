"""What training reads from disk cannot run code, changed bytes are found by their checksums, and
bad files fail in one line or fall back."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml

from bamba.train.dcp_checkpoint import (CHECKSUMS, TRAIN_STATE, Checkpointer, UnreadableCheckpoint,
                                        complete_checkpoints)
from bamba.train.safe_dcp import SafeLoadPlanner, SafeReader

from test_train_units import SMALL, _model_and_optimizer


class MakesDirectory:
    """Unpickling this creates a directory: the stand-in for arbitrary code."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return os.mkdir, (str(self.target),)


def _main(tmp_path: Path, *overrides: str) -> int:
    from bamba.train.__main__ import main

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model_overrides": SMALL, "out_dir": str(tmp_path / "run"),
                                      "seq_len": 32, "batch_size": 2, "warmup_steps": 1,
                                      "progress": False, "export": False, "bf16": False,
                                      "ckpt_every": 1}))
    return main([str(config), *overrides])


def _unverified(path: Path) -> Path:
    """The checkpoint at ``path`` without its checksums (as an older bamba wrote them): what
    lies past the checksum check is then read, and must still be refused."""
    (path / CHECKSUMS).unlink()
    return path


def test_every_file_has_a_checksum_and_a_changed_byte_is_named(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path / "ckpt")
    path = ckpt.save(1, *_model_and_optimizer(0), {"data": {}})
    sums = json.loads((path / CHECKSUMS).read_text())["sha256"]
    assert set(sums) == {p.name for p in path.iterdir()} - {CHECKSUMS}
    assert any(name.endswith(".distcp") for name in sums) and TRAIN_STATE in sums
    ckpt.load(path, *_model_and_optimizer(1))  # as written: loads
    data = next(path.glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    with pytest.raises(UnreadableCheckpoint, match=f"{data.name}: its bytes do not match"):
        ckpt.load(path, *_model_and_optimizer(1))
    data.unlink()
    with pytest.raises(UnreadableCheckpoint, match=f"{data.name}: missing"):
        ckpt.load(path, *_model_and_optimizer(1))
    (path / CHECKSUMS).write_text("[]")
    with pytest.raises(UnreadableCheckpoint, match="expected a JSON object"):
        ckpt.load(path, *_model_and_optimizer(1))


def test_crafted_metadata_is_refused_without_running_it(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path / "ckpt")
    model, opt = _model_and_optimizer(0)
    path = _unverified(ckpt.save(1, model, opt, {"data": {}}))
    marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(MakesDirectory(marker)))
    fresh, fresh_opt = _model_and_optimizer(1)
    with pytest.raises(UnreadableCheckpoint, match=r"posix\.mkdir is not allowed") as info:
        ckpt.load(path, fresh, fresh_opt)
    assert "\n" not in str(info.value)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:.*assuming the intent is to")
def test_pickled_object_in_a_checkpoint_entry_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    dcp.save({"x": MakesDirectory(marker), "w": torch.ones(2)}, checkpoint_id=tmp_path / "c")
    assert not marker.exists()
    state = {"x": None, "w": torch.zeros(2)}
    with pytest.raises(BaseException, match=r"checkpoint entry x is not plain data \(.*posix\.mkdir"):
        dcp.load(state, storage_reader=SafeReader(tmp_path / "c"), planner=SafeLoadPlanner())
    assert not marker.exists()


def test_metadata_pointing_outside_the_checkpoint_is_refused(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path / "ckpt")
    model, opt = _model_and_optimizer(0)
    path = _unverified(ckpt.save(1, model, opt, {}))
    metadata = pickle.loads((path / ".metadata").read_bytes())
    info = next(iter(metadata.storage_data.values()))
    info.relative_path = "../../secret.distcp"
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnreadableCheckpoint, match="not a data file of the checkpoint"):
        ckpt.load(path, *_model_and_optimizer(1))


@pytest.mark.parametrize("checksums", [True, False])
def test_corrupt_newest_checkpoint_falls_back_with_a_warning(checksums: bool, tmp_path: Path,
                                                             caplog, capsys) -> None:
    assert _main(tmp_path, "--steps=2") == 0
    (newest, older) = [p for _, p in complete_checkpoints(tmp_path / "run" / "checkpoints")][::-1]
    marker = tmp_path / "pwned"
    (newest / ".metadata").write_bytes(pickle.dumps(MakesDirectory(marker)))
    if not checksums:
        _unverified(newest)
    with caplog.at_level(logging.WARNING, logger="bamba.train.dcp_checkpoint"):
        assert _main(tmp_path, "--steps=3") == 0
    assert f"falling back to the previous checkpoint {older}" in caplog.text
    assert ("do not match their checksum" in caplog.text) == checksums
    assert not marker.exists()
    steps = [s for s, _ in complete_checkpoints(tmp_path / "run" / "checkpoints")]
    assert steps == [2, 3]  # resumed from step 1, re-saved 2, then 3
    for _, path in complete_checkpoints(tmp_path / "run" / "checkpoints"):
        (path / TRAIN_STATE).write_bytes(b"garbage")
        _unverified(path)
    capsys.readouterr()
    assert _main(tmp_path, "--steps=4") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bamba train: error: ") and "\n" not in err
    assert "no older checkpoint to fall back to" in err


@pytest.mark.parametrize("override, message", [
    ("--model_overrides.num_hidden_layers=1000000", "parameters x 16 bytes"),
    ("--batch_size=1000000000", "of activations for batch_size=1000000000 x seq_len=32"),
])
def test_absurd_sizes_fail_before_allocating(override: str, message: str, tmp_path: Path,
                                             capsys) -> None:
    assert _main(tmp_path, "--steps=1", override) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bamba train: error: this run needs at least") and "\n" not in err
    assert message in err and "is available" in err


def test_memory_estimate_counts_the_parameters_of_the_model() -> None:
    from bamba.config import preset
    from bamba.model import BambaLM
    from bamba.budget import check_memory, parameter_count

    for config in (preset("tiny", **SMALL), preset("bench"), preset("tiny", tie_word_embeddings=True)):
        with torch.device("meta"):
            model = BambaLM(config)
        assert parameter_count(config) == sum(p.numel() for p in model.parameters())
    config = preset("tiny", **SMALL)
    need = parameter_count(config) * 16
    check_memory(config, 1, 1, available=need + 10**6)
    with pytest.raises(ValueError, match="needs at least"):
        check_memory(config, 1, 1, available=need)
    check_memory(config, 1, 1, world_size=2, local_processes=1, available=need // 2 + 10**6)


def test_non_finite_loss_stops_without_saving(tmp_path: Path, monkeypatch, capsys) -> None:
    from bamba.train import trainer

    real_step, calls = trainer.train_step, []

    def poisoned(model, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the weights go bad during step 3
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return real_step(model, *args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", poisoned)
    assert _main(tmp_path, "--steps=5") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bamba train: error: step 3: loss nan") and "\n" not in err
    root = tmp_path / "run" / "checkpoints"
    assert f"the last good checkpoint is {root / 'step_00000002'}" in err
    assert [s for s, _ in complete_checkpoints(root)] == [1, 2]


def test_non_finite_hyperparameters_are_refused() -> None:
    from bamba.train.train_config import load_config

    for override in ("--lr=.inf", "--lr=.nan", "--weight_decay=-.inf", "--peak_tflops=.inf"):
        with pytest.raises(ValueError, match="must be a finite number"):
            load_config(None, [override])
