"""The few facts about torchrun/DDP the trainer needs: who am I, where do I run, and how to agree.

`torchrun --nproc-per-node N ghostify ...` sets RANK / WORLD_SIZE / LOCAL_RANK; a plain run has none of
them and is a world of one. Rank 0 logs and writes files; every rank holds the teacher and a student
replica, and DDP keeps the replicas equal.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ghostify.errors import ConfigError

__all__ = ["World", "init_world"]


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    started_here: bool = False  # this process group was created by init_world (so it tears it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_true(self, flag: bool) -> bool:
        """True only when `flag` holds on every rank (e.g. every rank's loss is finite)."""
        if not self.distributed:
            return flag
        value = torch.tensor([1.0 if flag else 0.0])
        if self.device.type == "cuda":
            value = value.to(self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item() > 0)

    def close(self) -> None:
        if self.started_here and dist.is_initialized():
            dist.destroy_process_group()


def init_world(device: str | torch.device | None = None) -> World:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA), or a world of one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():  # a process group the caller made: trust it over the environment
        rank, world_size = dist.get_rank(), dist.get_world_size()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {device!r} is not a device; use cpu or cuda.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but torch sees no CUDA device; use --device cpu.")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    started = False
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # evaluation runs on rank 0 while the others wait: allow long waits at the barrier
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=3))
        started = True
    return World(rank, world_size, local_rank, device, started)
