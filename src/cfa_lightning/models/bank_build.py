"""Building a LightningModule's memory bank from a loader: precision, progress, DDP (memory_bank.py
holds the constructions themselves)."""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_info
from tqdm.auto import tqdm

from ..distributed import all_gather_rows, reduce_bank_statistics, shard_loader, world_and_rank
from .memory_bank import NO_OWNER, image_ids


@torch.no_grad()
def build_bank(module: Any, loader: Any) -> float:
    """The bank of ``module.model`` from phi's initial output over ``loader``'s images; returns
    the build's seconds.

    Stops before any work when the bank's size or memory cannot work for these images. phi runs
    under the training forward's precision (bf16 autocast under bf16-mixed), so the centres live
    where the training and test descriptors do. Under DDP each rank reads only its own share of
    the images, the statistics are reduced over ranks, and all ranks take rank 0's centres.
    """
    bank, n_images = module.model.bank, len(loader.dataset)
    if n_images < 1:
        raise RuntimeError("memory bank has no training image; is the train split empty?")
    module.model.check_bank_size(bank.centres_for(n_images))
    bank.check_memory(n_images)
    bank.reset(n_images)
    trainer = module._trainer  # None when called outside a Trainer
    show = trainer is None or (trainer.is_global_zero and trainer.progress_bar_callback)
    precision = trainer.precision_plugin.train_step_context() if trainer else nullcontext()
    world, rank = world_and_rank()
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
    stats, count = reduce_bank_statistics(*bank.statistics(), bank.pooled)
    owners = all_gather_rows(bank.pool_owners()) if bank.pooled else None  # like the pool
    bank.finalize(stats, count, owners)
    if world > 1:
        torch.distributed.broadcast(bank.centres, src=0)
        torch.distributed.broadcast(bank.owners, src=0)
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


def fit_tap_scales(descriptor: Any, taps: list[torch.Tensor], world: int) -> None:
    """``model.tap_norm``: the descriptor's tap scales from the first bank batch's taps (averaged
    over ranks under DDP, so that every rank describes patches alike) before any patch is
    pooled."""
    scales = descriptor.fit_tap_scales(taps)
    if world > 1:
        torch.distributed.all_reduce(scales)
        scales /= world
    rank_zero_info("tap scales (model.tap_norm): " + ", ".join(f"{s:.4g}" for s in scales.tolist()))
