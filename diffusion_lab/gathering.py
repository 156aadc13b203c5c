"""Collect what every DDP rank drew on rank 0 (``torch.distributed.gather_object``)."""

from __future__ import annotations

from typing import TypeVar

import torch.distributed as dist

Item = TypeVar("Item")


def distributed() -> bool:
    """Whether a process group is up (a DDP run with more than one process)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_on_rank_zero(items: list[Item]) -> list[Item] | None:
    """Every rank's items on rank 0, rank 0's first (None on the other ranks); a single process
    keeps its own. Tensors among them should be on the CPU (pickled across)."""
    if not distributed():
        return items
    rank = dist.get_rank()
    shards = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(items, shards, dst=0)
    return [item for shard in shards for item in shard] if rank == 0 else None
