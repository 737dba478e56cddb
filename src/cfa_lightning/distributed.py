"""DDP helpers: a rank's own share of a loader, which evaluation samples are sampler padding, and
the collectives of the bank's build (one verdict for all ranks, statistics gathered on rank 0).

Two ways of sharding, both Lightning's samplers, because the loops differ:
- the bank pass is this project's own loop with one reduction at its end, so each rank reads an
  unpadded share, ``range(rank, n, world_size)`` (Lightning's ``UnrepeatedDistributedSampler``),
  and every training image counts exactly once in the mean;
- the evaluation loops are Lightning's, and the Trainer itself gives every evaluation loader a
  padded ``DistributedSampler`` (equal step counts on every rank). The repeats sit at the end of
  each rank's list, so a rank keeps the first ``len(range(rank, n, world_size))`` samples it sees
  (``PaddingFilter``). Moving evaluation to the unpadded sampler would need rank-aware loaders in
  the datamodule; the filter keeps the datamodule free of ranks.
"""

from __future__ import annotations

from typing import Any

import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler


def world_and_rank() -> tuple[int, int]:
    """(world size, rank) of the default process group; (1, 0) when not distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def shard_loader(loader: DataLoader, rank: int, world: int) -> DataLoader:
    """The same loader (batch size, workers, collate) reading only this rank's share, in order."""
    n = len(loader.dataset)
    if n < world:
        raise ValueError(
            f"{n} training image(s) cannot be shared over {world} ranks (each rank needs one); "
            "lower trainer.devices or trainer.num_nodes"
        )
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=UnrepeatedDistributedSampler(
            loader.dataset, num_replicas=world, rank=rank, shuffle=False
        ),
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

    def count(self, batch_size: int) -> int:
        """How many samples of the next batch are real (they come first)."""
        keep = self.keep(batch_size)
        return batch_size if keep is None else len(keep)


def current_eval_loader(trainer: Any, stage: str = "test", index: int = 0) -> DataLoader | None:
    """The ``stage`` ("val" or "test") loader the trainer is running (one or a list)."""
    loaders = getattr(trainer, f"{stage}_dataloaders", None)
    if isinstance(loaders, (list, tuple)):
        return loaders[index] if index < len(loaders) else None
    return loaders


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a list of one when not distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def collective_device() -> torch.device:
    """Where the default process group's collectives take tensors: this rank's GPU under NCCL,
    the CPU otherwise."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shared_error(message: str | None) -> str | None:
    """One verdict for all ranks: the message of the lowest rank that has one, on every rank, or
    None on every rank. A rank that raised alone would leave the others waiting in their next
    collective, so every rank calls this and then raises, or goes on, together."""
    world, rank = world_and_rank()
    if world == 1:
        return message
    device = collective_device()
    first = torch.tensor([world if message is None else rank], device=device)
    torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
    src = int(first)
    if src == world:
        return None
    text = (message or "(an error without a message)").encode()
    length = torch.tensor([len(text)], device=device)
    torch.distributed.broadcast(length, src=src)
    data = torch.zeros(int(length), dtype=torch.uint8)
    if rank == src:
        data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    data = data.to(device)  # (length,) the message's UTF-8 bytes
    torch.distributed.broadcast(data, src=src)
    return bytes(data.cpu().tolist()).decode()


def gather_rows(rows: Tensor, dst: int = 0) -> Tensor | None:
    """Every rank's (n_rank, ...) rows concatenated in rank order on rank ``dst`` (on the
    collectives' device), None on the others. The rows travel point to point into one buffer, so
    ``dst`` holds the whole once beside its own share and the other ranks nothing but theirs."""
    world, rank = world_and_rank()
    if world == 1:
        return rows
    device = collective_device()
    rows = rows.to(device).contiguous()
    count = torch.tensor([rows.shape[0]], device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    torch.distributed.all_gather(counts, count)
    if rank != dst:
        if rows.shape[0]:
            torch.distributed.send(rows, dst=dst)
        return None
    sizes = [int(c) for c in counts]
    whole = rows.new_empty(sum(sizes), *rows.shape[1:])
    start = 0
    for src, n in enumerate(sizes):
        if src == dst:
            whole[start : start + n] = rows
        elif n:
            torch.distributed.recv(whole[start : start + n], src=src)
        start += n
    return whole


def collect_bank_statistics(
    stats: Tensor, count: Tensor, owners: Tensor | None
) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """A memory bank's build statistics over all ranks, whole on rank 0 only, the one rank that
    finishes the bank (None elsewhere): the pool and its ``owners`` gathered in rank order, or
    the positional sums (``owners`` None) summed; the image count summed on every rank."""
    world, rank = world_and_rank()
    if world == 1:
        return stats, count, owners
    torch.distributed.all_reduce(count)
    if owners is None:
        torch.distributed.reduce(stats, dst=0)
        return (stats if rank == 0 else None), count, None
    return gather_rows(stats), count, gather_rows(owners)
