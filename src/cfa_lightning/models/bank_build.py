"""Building a LightningModule's memory bank from a loader: memory, precision, progress, DDP
(memory_bank.py holds the constructions themselves)."""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_info
from tqdm.auto import tqdm

from ..distributed import collect_bank_statistics, shard_loader, shared_error, world_and_rank
from .memory_bank import NO_OWNER, MemoryBank, image_ids


@torch.no_grad()
def build_bank(module: Any, loader: Any, cache_bytes: int = 0) -> float:
    """The bank of ``module.model`` from phi's initial output over ``loader``'s images; returns
    the build's seconds. ``cache_bytes``: the budget of the tap cache that fills during the pass
    (model.tap_cache_mb), counted in the memory the build needs.

    Stops before any work when the bank's size or memory cannot work for these images, on every
    rank alike. phi runs under the training forward's precision (bf16 autocast under bf16-mixed),
    so the centres live where the training and test descriptors do. Under DDP each rank reads
    only its own share of the images, rank 0 alone finishes the bank from all ranks' statistics,
    and the other ranks receive its centres.
    """
    bank, n_images = module.model.bank, len(loader.dataset)
    if n_images < 1:
        raise RuntimeError("memory bank has no training image; is the train split empty?")
    module.model.check_bank_size(bank.centres_for(n_images))
    world, rank = world_and_rank()
    share = len(range(rank, n_images, world))  # this rank's images
    cache = min(cache_bytes, share * tap_bytes_per_image(module.model))
    problem = shared_error(bank.memory_problem(n_images, module.device, world, rank, cache))
    if problem is not None:
        raise MemoryError(problem)
    bank.reset(n_images)
    trainer = module._trainer  # None when called outside a Trainer
    show = trainer is None or (trainer.is_global_zero and trainer.progress_bar_callback)
    precision = trainer.precision_plugin.train_step_context() if trainer else nullcontext()
    if world > 1:
        loader = shard_loader(loader, rank, world)
    start = time.perf_counter()
    with precision:
        for i, batch in enumerate(
            tqdm(loader, desc="Building memory bank", disable=not show, leave=False)
        ):
            images = batch["image"].to(module.device)
            taps = module.batch_taps(images, batch.get("image_path"))
            if i == 0 and module.model.descriptor.tap_norm:
                fit_tap_scales(module.model.descriptor, taps, world)
            owners = image_ids(batch.get("image_path"), len(images))
            bank.update(module.model.describe(images, taps), owners)
    stats, count = bank.statistics()
    owners = bank.pool_owners() if bank.pooled else None
    bank.drop_statistics()  # held by stats and owners alone: sent on and freed
    stats, count, owners = collect_bank_statistics(stats, count, owners)
    finish_on_rank_zero(bank, stats, count, owners)
    module.model.check_own_copies()
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


def tap_bytes_per_image(model: Any) -> int:
    """The most one image's taps can add to the tap cache: float32 taps at the input size."""
    height, width = model.input_size
    backbone = model.backbone
    return sum(4 * c * -(-height // s) * -(-width // s)
               for c, s in zip(backbone.channels, backbone.strides, strict=True))  # fmt: skip


def fit_tap_scales(descriptor: Any, taps: list[torch.Tensor], world: int) -> None:
    """``model.tap_norm``: the descriptor's tap scales from the first bank batch's taps (averaged
    over ranks under DDP, so that every rank describes patches alike) before any patch is
    pooled."""
    scales = descriptor.fit_tap_scales(taps)
    if world > 1:
        torch.distributed.all_reduce(scales)
        scales /= world
    rank_zero_info("tap scales (model.tap_norm): " + ", ".join(f"{s:.4g}" for s in scales.tolist()))
