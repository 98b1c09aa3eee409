"""The process group of a ``torchrun`` job and the few collectives the engine uses (each a no-op
in one process).

On CUDA the group has two backends, ``cpu:gloo,cuda:nccl``: NCCL carries the tensors on the GPU
(gradients, evaluation scores, BatchNorm statistics) and Gloo the run's bookkeeping, which lives
in CPU tensors (the stop request polled every step, the logged losses, the skip counts, RNG
states); a plain ``nccl`` group accepts CUDA tensors only.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "all_gather_object",
    "all_gather_tensor",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "cleanup_distributed",
    "init_distributed",
    "process_group_backend",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def process_group_backend(backend: str | None, cuda: bool) -> str:
    """The backend string of the process group.

    Args:
        backend: ``gloo``, ``nccl`` or None (nccl where CUDA is used, else gloo). NCCL is given
            Gloo for CPU tensors: ``cpu:gloo,cuda:nccl``. A ``device:backend`` list passes as it is.
        cuda: whether this process runs on a CUDA device.

    Raises:
        ValueError: another backend name.
    """
    if backend is None:
        backend = "nccl" if cuda else "gloo"
    if ":" in backend:
        return backend
    if backend == "nccl":
        return "cpu:gloo,cuda:nccl"
    if backend == "gloo":
        return backend
    raise ValueError(
        f"distributed backend: expected 'gloo', 'nccl' or 'device:backend' pairs, got {backend!r}"
    )


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's env vars when ``WORLD_SIZE > 1``.

    Args:
        backend: ``gloo`` or ``nccl`` (see :func:`process_group_backend`); default nccl (with
            gloo for CPU tensors) when CUDA is available, else gloo.

    Returns:
        rank, world size and local rank (0, 1, 0 when not distributed).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = process_group_backend(backend, torch.cuda.is_available())
        if "nccl" in backend:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, init_method="env://")
        logger.info("joined %s process group: rank %d of %d", backend, rank, world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def cleanup_distributed() -> None:
    """Leave the process group, if any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _active():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes (in place; returned for chaining)."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Maximum over processes (in place; returned for chaining)."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over processes (in place; returned for chaining)."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 the tensors of every process (rank order); sizes may differ."""
    if not _active():
        return tensor
    world = dist.get_world_size()
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order; ``[obj]`` in one process."""
    if not _active():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
