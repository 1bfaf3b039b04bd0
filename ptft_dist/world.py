"""The distributed layout of one process, read once from the environment, and rank helpers
that work with or without a process group.

torchrun and Ray Train set the same variables (RANK, LOCAL_RANK, WORLD_SIZE, ...), so one
``World.from_env()`` serves every launcher. Nothing deep in the code calls
``dist.get_rank()``: the recipe builds one World and passes it down.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    node_rank: int = 0

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> World:
        env = os.environ
        return cls(
            rank=int(env.get("RANK", 0)),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=int(env.get("WORLD_SIZE", 1)),
            node_rank=int(env.get("NODE_RANK", env.get("GROUP_RANK", 0))),
        )


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Collective: every rank must call it. A no-op without a process group."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few floats over ranks (collective). Without a process group, returns them."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(values: list[float]) -> list[float]:
    """Element-wise max of a few floats over ranks (collective)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def direct_all_gather(output: torch.Tensor, input: torch.Tensor, group=None) -> None:
    """``dist.all_gather_into_tensor`` as one send and one receive per pair of ranks, all posted
    at once (collective: every rank of ``group`` calls it). ``output`` holds the ranks' inputs
    in rank order.

    Over gloo it moves the same bytes per rank as gloo's ring all-gather in about half the
    time (docs/performance.md; gloo's all-gather is slow over TCP, pytorch/gloo#471).
    """
    ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
    if output.numel() != len(ranks) * input.numel() or output.dtype != input.dtype:
        raise ValueError(
            f"direct_all_gather: the output ({output.numel()} x {output.dtype}) must hold {len(ranks)} inputs "
            f"({input.numel()} x {input.dtype})"
        )
    me = dist.get_rank(group)  # the rank within the group: the index of its chunk
    chunks = output.view(-1).chunk(len(ranks))
    chunks[me].copy_(input.view(-1))
    ops = []
    for i, peer in enumerate(ranks):
        if i != me:
            ops += [dist.P2POp(dist.isend, input, peer, group), dist.P2POp(dist.irecv, chunks[i], peer, group)]
    for work in dist.batch_isend_irecv(ops) if ops else ():
        work.wait()


def all_gather_object(obj):
    """Gather one picklable object from every rank, in rank order (collective)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Send ``obj`` from ``src`` to every rank (collective)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def collective_batches(num_items: int, batch_size: int, world: World) -> Iterator[slice | None]:
    """This rank's batches of ``num_items`` items, in rounds that every rank takes part in.

    Round r gives rank k batch ``r * world_size + k``; a rank past the last batch gets
    ``None`` for that round and must still run the collective work of the round (a ZeRO-3
    forward gathers parameters from every rank), with a throwaway input.
    """
    num_batches = math.ceil(num_items / batch_size)
    for r in range(math.ceil(num_batches / world.world_size)):
        b = r * world.world_size + world.rank
        yield slice(b * batch_size, min((b + 1) * batch_size, num_items)) if b < num_batches else None
