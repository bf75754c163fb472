"""Training checkpoints with torch.distributed.checkpoint (DCP), written atomically.

Layout under the run's checkpoint root::

    step_00000040/          a complete checkpoint (the only kind a loader ever picks)
        .metadata, __R_0.distcp ...   DCP: model + optimizer, sharded per rank, reshardable
        train_state.pt      step, world size, per-rank data-loader state and RNG state
    step_00000050.tmp/      a checkpoint being written (ignored; removed by the next save)

Every rank writes into ``step_N.tmp``; when all have finished (barrier) rank 0 renames it to
``step_N``: a crash at any point before the rename leaves the previous checkpoint the newest
complete one. DCP stores the model and optimizer as global tensors, so a checkpoint written by
N processes loads in M. ``train_state.pt`` holds only tensors, numbers, strings, lists and dicts
and is read with ``torch.load(weights_only=True)`` (no unpickling of arbitrary objects).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from bamba.train.parallel import barrier

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"step_(\d{8})")
TRAIN_STATE = "train_state.pt"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def complete_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = STEP_DIR.fullmatch(path.name)
        if match and (path / ".metadata").is_file() and (path / TRAIN_STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` on every rank (a list of one in a single process)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def _quiet_dcp() -> Iterator[None]:
    """DCP warns that it 'assumes a single process' when there is no process group: that is
    the intent here, so silence exactly that warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        yield


class Checkpointer:
    """Save / find / load training checkpoints under ``root``, keeping the newest ``keep_last``."""

    def __init__(self, root: str | os.PathLike, keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             local_state: dict[str, Any], meta: dict[str, Any] | None = None) -> Path:
        """Collective: every rank calls it with its own ``local_state`` (loader, RNG)."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        final, tmp = step_dir(self.root, step), step_dir(self.root, step).with_suffix(".tmp")
        if rank == 0:
            self._clear_partial()
            tmp.mkdir(parents=True)
        barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with _quiet_dcp():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
        ranks = _gather(local_state)
        if rank == 0:
            world = len(ranks)
            state = {"step": step, "world_size": world, "ranks": ranks, "meta": meta or {}}
            self._write_train_state(tmp, state)
        barrier()  # every rank's DCP files are on disk
        if rank == 0:
            self._publish(tmp, final)
        barrier()
        log.info("saved checkpoint %s", final)
        return final

    def load(self, path: str | os.PathLike, model: nn.Module,
             optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Restore model and optimizer in place (at any world size); returns the train state
        (``step``, ``world_size``, ``ranks`` = the per-rank local states, ``meta``)."""
        path = Path(path)
        if not (path / ".metadata").is_file() or not (path / TRAIN_STATE).is_file():
            raise ValueError(f"{path}: not a complete training checkpoint")
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        with _quiet_dcp():
            dcp.load(state, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        train_state = torch.load(path / TRAIN_STATE, weights_only=True)
        log.info("resumed from %s (step %d, written by %d processes)", path,
                 train_state["step"], train_state["world_size"])
        return train_state

    def _write_train_state(self, directory: Path, state: dict[str, Any]) -> None:
        part = directory / (TRAIN_STATE + ".part")
        torch.save(state, part)
        with open(part, "rb") as f:
            os.fsync(f.fileno())
        os.replace(part, directory / TRAIN_STATE)

    def _publish(self, tmp: Path, final: Path) -> None:
        if final.exists():  # re-saving a step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        for _, old in complete_checkpoints(self.root)[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def _clear_partial(self) -> None:
        """Remove ``*.tmp`` directories left by a crash mid-write."""
        if not self.root.is_dir():
            return
        for path in self.root.iterdir():
            if path.name.endswith(".tmp") and STEP_DIR.fullmatch(path.name[:-4]):
                log.warning("removing incomplete checkpoint %s", path)
                shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
