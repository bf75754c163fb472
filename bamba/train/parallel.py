"""Process group set-up and FSDP2 sharding, kept out of the model code.

``torchrun`` sets RANK/WORLD_SIZE/LOCAL_RANK; without them (or with WORLD_SIZE=1) training runs in
one process with no process group. Backend: nccl when CUDA is available, else gloo.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Join the torchrun process group if there is one (idempotent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if world <= 1:
        return DistInfo(0, 1, 0, device)
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    info = DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)
    log.debug("rank %d of %d on %s", info.rank, info.world_size, device)
    return info


def teardown(clean: bool = True) -> None:
    """Leave the process group. Every rank passes a barrier first on a clean exit: without it
    gloo can abort at exit ("terminate called without an active exception"). After an error, skip the barrier (the
    other ranks may never reach it) and let torchrun stop them."""
    if not dist.is_initialized():
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over ranks (one collective); identity in one process."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in the backward pass (composable API: names unchanged, so
    checkpoints and the HF export are unaffected)."""
    from torch.distributed._composable import checkpoint

    for layer in model.model.layers:
        checkpoint(layer)


def shard_model(model: nn.Module) -> nn.Module:
    """FSDP2: one ``fully_shard`` unit per decoder layer, then the root (embedding, final norm,
    LM head). Parameters become DTensors sharded on dim 0 across the world."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model
