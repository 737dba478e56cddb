"""Filling a model's memory bank from a loader: memory, precision, progress, DDP
(memory_bank.py holds the constructions themselves)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_info
from tqdm.auto import tqdm

from ..distributed import collect_bank_statistics, shard_loader, shared_error, world_and_rank
from .cfa import CFA
from .descriptor import PatchDescriptor
from .memory_bank import NO_OWNER, MemoryBank, image_ids

# The backbone's taps of a batch of images (and their paths, which key a tap cache).
TapsOf = Callable[[torch.Tensor, Sequence[str] | None], list[torch.Tensor]]


@torch.no_grad()
def fill_bank(
    model: CFA,
    loader: Any,
    *,
    device: torch.device,
    taps: TapsOf,
    precision: AbstractContextManager,
    progress: bool,
    cache_bytes: int,
) -> float:
    """The bank of ``model`` from phi's initial output over ``loader``'s images, on ``device``;
    returns the build's seconds. ``taps``: the backbone's taps of a batch (the LightningModule's
    tap cache, which fills during the pass); ``cache_bytes``: that cache's budget
    (model.tap_cache_mb), counted in the memory the build needs. ``precision``: the training
    forward's context (bf16 autocast under bf16-mixed), so the centres live where the training
    and test descriptors do. ``progress``: show a progress bar.

    Stops before any work when the bank's size or memory cannot work for these images, on every
    rank alike. Under DDP each rank reads only its own share of the images, rank 0 alone
    finishes the bank from all ranks' statistics, and the other ranks receive its centres.
    """
    bank, n_images = model.bank, len(loader.dataset)
    if n_images < 1:
        raise RuntimeError("memory bank has no training image; is the train split empty?")
    model.check_bank_size(bank.centres_for(n_images))
    world, rank = world_and_rank()
    share = len(range(rank, n_images, world))  # this rank's images
    cache = min(cache_bytes, share * tap_bytes_per_image(model))
    problem = shared_error(bank.memory_problem(n_images, device, world, rank, cache))
    if problem is not None:
        raise MemoryError(problem)
    bank.reset(n_images)
    if world > 1:
        loader = shard_loader(loader, rank, world)
    start = time.perf_counter()
    with precision:
        batches = tqdm(loader, desc="Building memory bank", disable=not progress, leave=False)
        for i, batch in enumerate(batches):
            images, paths = batch["image"].to(device), batch.get("image_path")
            batch_taps = taps(images, paths)
            if i == 0 and model.descriptor.tap_norm:
                fit_tap_scales(model.descriptor, batch_taps, world)
            bank.update(model.describe(images, batch_taps), image_ids(paths, len(images)))
    stats, count = bank.statistics()
    owners = bank.pool_owners() if bank.pooled else None
    bank.drop_statistics()  # held by stats and owners alone: sent on and freed
    stats, count, owners = collect_bank_statistics(stats, count, owners)
    finish_on_rank_zero(bank, stats, count, owners)
    model.check_own_copies()
    seconds = time.perf_counter() - start
    owned = int((bank.owners != NO_OWNER).sum())
    rank_zero_info(
        f"memory bank ({bank.construction}) built from {int(count)} training images in "
        f"{seconds:.1f} s: {bank.n_centres} centres of {bank.dim} dims"
        + (
            f"; {owned} are one image's own copies, left out of that image's search"
            if owned
            else ""
        )
    )
    return seconds


def finish_on_rank_zero(
    bank: MemoryBank,
    stats: torch.Tensor | None,
    count: torch.Tensor,
    owners: torch.Tensor | None,
) -> None:
    """Rank 0 finishes the bank from the whole build's statistics (`collect_bank_statistics`) and
    the other ranks receive its centres and owners as tensors; if rank 0 fails, every rank
    raises with its message."""
    world, rank = world_and_rank()
    if world == 1:
        bank.finalize(stats, count, owners)
        return
    failure: Exception | None = None
    if rank == 0:
        try:
            bank.finalize(stats, count, owners)
        except Exception as err:  # raised below, on every rank together
            failure = err
    message = shared_error(None if failure is None else str(failure))
    if failure is not None:
        raise failure
    if message is not None:
        raise RuntimeError(f"the memory bank could not be built on rank 0: {message}")
    m = bank.centres_for(int(count))
    centres = bank.centres if rank == 0 else bank.centres.new_empty(m, bank.dim)  # (M, D')
    centre_owners = bank.owners if rank == 0 else bank.owners.new_empty(m)  # (M,)
    torch.distributed.broadcast(centres, src=0)
    torch.distributed.broadcast(centre_owners, src=0)
    if rank != 0:
        bank.assign(centres, centre_owners)


def tap_bytes_per_image(model: CFA) -> int:
    """The most one image's taps can add to the tap cache: float32 taps at the input size."""
    height, width = model.input_size
    backbone = model.backbone
    return sum(
        4 * c * -(-height // s) * -(-width // s)
        for c, s in zip(backbone.channels, backbone.strides, strict=True)
    )


def fit_tap_scales(descriptor: PatchDescriptor, taps: list[torch.Tensor], world: int) -> None:
    """``model.tap_norm``: the descriptor's tap scales from the first bank batch's taps (averaged
    over ranks under DDP, so that every rank describes patches alike) before any patch is
    pooled."""
    scales = descriptor.fit_tap_scales(taps)
    if world > 1:
        torch.distributed.all_reduce(scales)
        scales /= world
    rank_zero_info("tap scales (model.tap_norm): " + ", ".join(f"{s:.4g}" for s in scales.tolist()))
