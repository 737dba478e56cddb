"""DDP helpers: a rank's own share of a loader, and which evaluation samples are sampler padding.

Under DDP, Lightning gives each evaluation loader a ``DistributedSampler`` that pads the dataset
with repeated indices until it splits evenly over the ranks. The repeats sit at the end of each
rank's list, so a rank keeps the first ``len(range(rank, n, world_size))`` samples it sees.
The bank loader gets no padding at all: each rank reads ``range(rank, n, world_size)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler


def world_and_rank() -> tuple[int, int]:
    """(world size, rank) of the default process group; (1, 0) when not distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class ShardSampler(Sampler[int]):
    """Dataset indices ``rank, rank + world, ...``: every sample read by exactly one rank, no
    padding, so the ranks may get different counts."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = range(rank, n, world)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def shard_loader(loader: DataLoader, rank: int, world: int) -> DataLoader:
    """The same loader (batch size, workers, collate) reading only this rank's share, in order."""
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=ShardSampler(len(loader.dataset), rank, world),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers,
    )


def rank_sample_indices(loader: DataLoader) -> list[int] | None:
    """The dataset indices this rank will see, in order, padding removed (None if unknown)."""
    sampler = getattr(loader, "sampler", None)
    if sampler is None:
        return None
    try:
        indices = [int(i) for i in iter(sampler)]
    except TypeError:  # a sampler that does not yield indices
        return None
    if isinstance(sampler, DistributedSampler) and not sampler.drop_last:
        n_real = len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))
        indices = indices[:n_real]
    return indices


class PaddingFilter:
    """Walks an evaluation loader batch by batch and says which samples of each batch are real.

    ``keep(batch_size)`` returns the dataset indices of the real samples of the next batch (a
    prefix of the batch, since padding only ever comes last). Without a loader, all are real.
    """

    def __init__(self, loader: DataLoader | None = None) -> None:
        self.indices = rank_sample_indices(loader) if loader is not None else None
        self.position = 0

    def keep(self, batch_size: int) -> list[int] | None:
        """Dataset indices of the real samples of the next batch; None when nothing is known."""
        start = self.position
        self.position += batch_size
        if self.indices is None:
            return None
        return self.indices[start : start + batch_size]


def current_eval_loader(trainer: Any, dataloader_idx: int = 0) -> DataLoader | None:
    """The test loader the trainer is running (Lightning keeps one or a list)."""
    loaders = getattr(trainer, "test_dataloaders", None)
    if isinstance(loaders, (list, tuple)):
        return loaders[dataloader_idx] if dataloader_idx < len(loaders) else None
    return loaders


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a list of one when not distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered
