"""Lightning-free helpers for code that runs on every rank of a torch.distributed job.

All of them degrade to the single-process answer when no process group exists,
so the analysis code is the same on one CPU and on many GPUs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Iterator, TypeVar

import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_rank_zero() -> bool:
    return rank() == 0


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank (a collective: all ranks must call it)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


# What gloo raises on a rank whose peer process ended (a crash, or a one-line error such as an unreadable image).
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def peer_stopped(err: BaseException | None) -> bool:
    """Whether ``err`` (or an exception it was explicitly raised from) is gloo's report that another process of the
    job ended while this one was waiting for it in a collective. Other network errors (a port in use, a timeout)
    and errors raised while handling one are not: their own message is the one to show."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, RuntimeError) and any(text in str(err) for text in _PEER_GONE):
            return True
        seen.add(id(err))
        err = err.__cause__
    return False


@dataclass(frozen=True)
class Distributed:
    """How an analysis shares its work among the processes of a job: this process's rank, the number of
    processes, and a function that gathers one picklable object from every rank (in rank order) on every rank.

    The library functions take ``distributed=None`` (one process) or such a handle; the Lightning callbacks pass
    :meth:`current`, and any other launcher can pass its own gather.

    >>> Distributed.single()
    Distributed(rank=0, world_size=1, all_gather=None)
    """

    rank: int = 0
    world_size: int = 1
    all_gather: Callable[[Any], list[Any]] | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.world_size, int) and self.world_size >= 1 and isinstance(self.rank, int)
                and 0 <= self.rank < self.world_size):
            raise ValueError(f"distributed: need 0 <= rank < world_size, got rank={self.rank!r}, "
                             f"world_size={self.world_size!r}")
        if self.world_size > 1 and self.all_gather is None:
            raise ValueError("distributed: all_gather is needed when world_size > 1")

    @classmethod
    def single(cls) -> Distributed:
        """One process, nothing to gather."""
        return cls()

    @classmethod
    def current(cls) -> Distributed:
        """The torch.distributed job this process belongs to (one process when none is initialised)."""
        size = world_size()
        return cls(rank(), size, all_gather_objects if size > 1 else None)

    @property
    def is_lead(self) -> bool:
        """Whether this process writes files and prints (rank 0)."""
        return self.rank == 0

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj`` in rank order (a collective when world_size > 1)."""
        return [obj] if self.world_size == 1 else self.all_gather(obj)  # type: ignore[misc]


class UnpaddedDistributedSampler(DistributedSampler):
    """Shards a dataset across ranks without repeating samples.

    torch's ``DistributedSampler`` pads the index list by repeating samples so that
    every rank gets the same count; for evaluation those repeats would be counted
    twice. Here rank ``r`` gets indices ``r, r + W, r + 2W, ...``; ranks may differ by
    one sample, which is harmless in evaluation (no gradient all-reduce per step),
    and metric sums over ranks count every sample exactly once.
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(self.rank, len(self.dataset), self.num_replicas))  # type: ignore[arg-type]
        self.total_size = len(self.dataset)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


__all__ = [
    "Distributed",
    "UnpaddedDistributedSampler",
    "all_gather_objects",
    "is_distributed",
    "is_rank_zero",
    "rank",
    "world_size",
]
