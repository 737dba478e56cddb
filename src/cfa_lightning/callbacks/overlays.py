"""Overlay grids of test images, per defect type, saved into the run folder."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from PIL import Image
from pytorch_lightning.utilities import rank_zero_info

from ..metrics import is_anomalous
from ..visualize import HeatScale, overlay_panel


class TestOverlays(pl.Callback):
    """Saves `<dirpath>/<defect type>.png`: up to `per_type` test images of each type ("good"
    and every defect), one row each: image | heat map | predicted (red) and true (green) defect.

    The sample is the first images of each type in the (unshuffled) test order: fixed and bounded.
    Under DDP only rank 0 draws, from its own share of the test set (the distributed sampler
    deals images rank, rank + world, ...): the files are then `<defect type>_rank0of<world>.png`
    and the log says so.
    All heat maps share the model's colour scale (`visualize.HeatScale`, shown as a colour bar
    under each grid with the calibrated pixel threshold marked); predicted defect = map >= that
    threshold. An uncalibrated model gets one min-max scale over all the saved maps, no contour.
    """

    def __init__(self, dirpath: str, per_type: int = 4) -> None:
        self.dirpath = Path(dirpath)
        self.per_type = per_type
        self._rows: dict[str, list[tuple[np.ndarray, ...]]] = defaultdict(list)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rows = defaultdict(list)

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if outputs is None or not trainer.is_global_zero:
            return
        for j, defect in enumerate(batch.get("defect_type", ["test"] * len(batch["image"]))):
            if len(self._rows[defect]) >= self.per_type:
                continue
            image = batch["image"][j].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
            pixels = (image * 255).astype(np.uint8)  # (H, W, 3)
            fmap = outputs.maps[j].detach().float().cpu().numpy()  # (H, W)
            mask = batch["mask"][j, 0].detach().cpu().numpy() > 0  # (H, W)
            self._rows[defect].append((pixels, fmap, mask))

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._rows or not trainer.is_global_zero:
            return
        cal = pl_module.model.calibration
        scale = HeatScale.from_calibration(cal) or HeatScale.spanning(
            [fmap for rows in self._rows.values() for _, fmap, _ in rows]
        )
        threshold = float(cal.pixel_threshold) if bool(cal.fitted) else None
        self.dirpath.mkdir(parents=True, exist_ok=True)
        world = trainer.world_size
        suffix = f"_rank0of{world}" if world > 1 else ""
        share = f"rank 0's share (1/{world}) of the test set" if world > 1 else "the test set"
        rank_zero_info(
            f"test overlays: the first {self.per_type} images of each type in {share} -> "
            f"{self.dirpath}"
        )
        for defect, rows in self._rows.items():
            panels = []
            for image, fmap, truth in rows:
                mask = is_anomalous(fmap, threshold) if threshold is not None else None
                panels.append(overlay_panel(image, scale(fmap), mask, truth))
            grid = np.concatenate(panels, axis=0)  # (n * H, 3W, 3)
            grid = np.concatenate([grid, scale.colour_bar(grid.shape[1])], axis=0)
            Image.fromarray(grid).save(self.dirpath / f"{defect}{suffix}.png")
