"""Training checkpoints with torch.distributed.checkpoint (DCP), written atomically.

Layout under the run's checkpoint root::

    step_00000040/          a complete checkpoint (the only kind a loader ever picks)
        .metadata, __R_0.distcp ...   DCP: model + optimizer, sharded per rank, reshardable
        train_state.pt      step, world size, per-rank data-loader state and RNG state
        checksums.json      the SHA-256 of every file above, written last
    step_00000050.tmp/      a checkpoint being written (ignored; removed by the next save)

Every rank writes into ``step_N.tmp``; when all have finished (barrier) rank 0 renames it to
``step_N``: a crash at any point before the rename leaves the previous checkpoint the newest
complete one. DCP stores the model and optimizer as global tensors, so a checkpoint written by
N processes loads in M. ``train_state.pt`` holds only tensors, numbers, strings, lists and dicts
and is read with ``torch.load(weights_only=True)``; DCP's files are read through
``bamba.train.safe_dcp`` (allow-listed metadata, checked byte ranges): nothing read from a
checkpoint directory can run code. Before anything is read the files are checked against
``checksums.json`` (each rank hashes the files it wrote, and checks a share of them on
loading), so a flipped bit or a cut file is found, not trained on. A checkpoint that fails to
read or to match raises ValueError, and ``Checkpointer.load_latest`` then falls back to the
previous one. (A checkpoint written before checksums existed loads unchecked.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from bamba.files import read_json_object
from bamba.train.parallel import barrier
from bamba.train.safe_dcp import SafeLoadPlanner, SafeReader

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"step_(\d{8})")
TRAIN_STATE = "train_state.pt"
CHECKSUMS = "checksums.json"


class UnreadableCheckpoint(ValueError):
    """A checkpoint whose files are missing, corrupt or not what DCP and we write."""


def read_train_state(path: Path) -> dict[str, Any]:
    """``train_state.pt`` of the checkpoint at ``path`` (tensors and plain data only), checked
    for the keys a resume uses."""
    file = path / TRAIN_STATE
    if not (path / ".metadata").is_file() or not file.is_file():
        raise UnreadableCheckpoint(f"{path}: not a complete training checkpoint")
    try:
        state = torch.load(file, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise UnreadableCheckpoint(f"{file}: unreadable ({_first_line(exc)})") from None
    ok = (isinstance(state, dict) and isinstance(state.get("step"), int)
          and isinstance(state.get("world_size"), int) and isinstance(state.get("ranks"), list)
          and len(state["ranks"]) == state["world_size"] and isinstance(state.get("meta"), dict))
    if not ok:
        raise UnreadableCheckpoint(f"{file}: not a training state (step, world_size, ranks, meta)")
    return state


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_checksums(path: Path) -> None:
    """Collective: UnreadableCheckpoint naming the first file of the checkpoint at ``path``
    whose bytes are not those written (each rank checks a share of the files)."""
    file = path / CHECKSUMS
    if not file.is_file():
        log.info("%s has no %s (written by an older bamba): not verified", path, CHECKSUMS)
        return
    try:
        sums = read_json_object(file).get("sha256")
    except ValueError as exc:
        raise UnreadableCheckpoint(str(exc)) from None
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise UnreadableCheckpoint(f"{file}: expected {{\"sha256\": {{file: digest}}}}")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    failure = None
    for name in sorted(sums)[rank::world]:
        target = path / name
        if target.parent != path or not target.is_file():
            failure = f"{target}: missing"
        elif file_sha256(target) != sums[name]:
            failure = f"{target}: its bytes do not match their checksum (corrupt or changed)"
        if failure is not None:
            break
    failures = [f for f in _gather(failure) if f is not None]
    if failures:
        raise UnreadableCheckpoint(failures[0])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _first_failure(exc: CheckpointException) -> str:
    """The first rank's error of a DCP failure, in one line."""
    for error, _ in exc.failures.values():
        return _first_line(error)
    return _first_line(exc)


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
        # each rank hashes the data files it wrote (DCP names them __<rank>_<n>.distcp)
        sums = _gather({p.name: file_sha256(p) for p in tmp.glob(f"__{rank}_*.distcp")})
        if rank == 0:
            world = len(ranks)
            state = {"step": step, "world_size": world, "ranks": ranks, "meta": meta or {}}
            self._write_train_state(tmp, state)
            self._write_checksums(tmp, {name: s for part in sums for name, s in part.items()})
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
        verify_checksums(path)
        train_state = read_train_state(path)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        try:
            with _quiet_dcp():
                dcp.load(state, storage_reader=SafeReader(path), planner=SafeLoadPlanner())
        except CheckpointException as exc:  # DCP gathers every rank's failure into one
            raise UnreadableCheckpoint(f"{path}: unreadable checkpoint "
                                       f"({_first_failure(exc)})") from None
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        log.info("resumed from %s (step %d, written by %d processes)", path,
                 train_state["step"], train_state["world_size"])
        return train_state

    def load_latest(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                    check: Callable[[Path, dict[str, Any]], None] | None = None,
                    ) -> dict[str, Any] | None:
        """Load the newest checkpoint that reads (None if there is none), warning about each
        newer one that does not. ``check(path, train_state)`` may refuse a checkpoint with a
        ValueError before it is loaded (that error propagates: no fall-back)."""
        found = complete_checkpoints(self.root)
        for i in range(len(found) - 1, -1, -1):
            path = found[i][1]
            try:
                if check is not None:
                    check(path, read_train_state(path))
                return self.load(path, model, optimizer)
            except UnreadableCheckpoint as exc:
                if i == 0:
                    raise UnreadableCheckpoint(f"{exc}; no older checkpoint to fall back to "
                                               "(remove it or pass --resume=false)") from None
                log.warning("%s; falling back to the previous checkpoint %s", exc, found[i - 1][1])
        return None

    def _write_train_state(self, directory: Path, state: dict[str, Any]) -> None:
        part = directory / (TRAIN_STATE + ".part")
        torch.save(state, part)
        _fsync_file(part)
        os.replace(part, directory / TRAIN_STATE)

    def _write_checksums(self, directory: Path, hashed: dict[str, str]) -> None:
        """checksums.json: the ranks' ``hashed`` files and every other file of the directory."""
        sums = {p.name: hashed.get(p.name) or file_sha256(p)
                for p in sorted(directory.iterdir()) if p.is_file()}
        part = directory / (CHECKSUMS + ".part")
        part.write_text(json.dumps({"sha256": sums}, indent=1) + "\n")
        _fsync_file(part)
        os.replace(part, directory / CHECKSUMS)

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


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
