"""Data-parallel evaluation over torch.distributed: the rank, world size and collectives that lm-eval's
evaluator asks its model for (`rank`, `world_size`, `all_gather`, `gather_object`, `barrier`).

lm-eval splits the documents itself (rank r takes documents r, r + N, r + 2N, ...), runs each rank's
requests through the model, and gathers the per-document metrics on rank 0, which alone returns results.
All a backend supplies is the process group: the one a DDP training run already has, or, under
`torchrun --nproc-per-node N`, one made here (nccl with one GPU per process, cuda:LOCAL_RANK; gloo on
CPU) and closed at exit.
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from spectralds.errors import UserError


@dataclass(frozen=True)
class Ranks:
    """This process's place in the group (rank 0 of 1 outside one)."""

    rank: int = 0
    world_size: int = 1


def launched_world_size() -> int:
    """The number of processes torchrun (or SLURM through Lightning) started: WORLD_SIZE, 1 without it."""
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"WORLD_SIZE={value!r} in the environment is not a positive number of processes")
    return int(value)


def local_device(device: torch.device) -> torch.device:
    """One GPU per process, as torchrun and DDP mean it: among several processes a CUDA device is this
    process's own, cuda:LOCAL_RANK (lm-eval's HF backend does the same through accelerate)."""
    if device.type != "cuda" or launched_world_size() == 1:
        return device
    own = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.index is not None and device.index != own.index:
        logging.getLogger(__name__).warning("device %s asked for in process %s: using %s", device,
                                            os.environ.get("RANK", "?"), own)
    return own


def join(device: torch.device) -> Ranks:
    """The group this process evaluates in: an initialized one (a DDP run's), else the one torchrun's
    environment describes (created here on `device`'s backend), else none (rank 0 of 1)."""
    if not dist.is_available():
        return Ranks()
    if not dist.is_initialized():
        if launched_world_size() == 1:
            return Ranks()
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        atexit.register(_close)
    return Ranks(dist.get_rank(), dist.get_world_size())


def _close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    """Where a tensor must be for the group's backend: nccl moves CUDA tensors, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Every rank's tensor, concatenated in rank order along dim 0 (a scalar counts as one row), on the
    tensor's device: what lm-eval's evaluator expects (it gathers each rank's request count)."""
    if ranks.world_size == 1:
        return tensor
    local = tensor.reshape(1) if tensor.dim() == 0 else tensor
    moved = local.to(_comm_device())
    parts = [torch.empty_like(moved) for _ in range(ranks.world_size)]
    dist.all_gather(parts, moved)
    return torch.cat(parts).to(tensor.device)


def gather_object(obj: Any, ranks: Ranks, dst: int = 0) -> list[Any] | None:
    """[rank 0's obj, rank 1's obj, ...] on rank `dst`, None on the others."""
    if ranks.world_size == 1:
        return [obj]
    gathered: list[Any] | None = [None] * ranks.world_size if ranks.rank == dst else None
    dist.gather_object(obj, gathered, dst=dst)
    return gathered


def broadcast_object(obj: Any, ranks: Ranks, src: int = 0) -> Any:
    """Rank `src`'s obj on every rank."""
    if ranks.world_size == 1:
        return obj
    box = [obj if ranks.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(ranks: Ranks) -> None:
    if ranks.world_size > 1:
        dist.barrier()
