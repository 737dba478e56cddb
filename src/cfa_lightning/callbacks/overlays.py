"""Overlay grids of test images, per defect type, saved into the run folder."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from PIL import Image

from ..visualize import overlay_panel


class TestOverlays(pl.Callback):
    """Saves `<dirpath>/<defect type>.png`: up to `per_type` test images of each type ("good"
    and every defect), one row each: image | heat map | predicted (red) and true (green) defect.

    The sample is the first images of each type in the (unshuffled) test order: fixed and bounded.
    The heat map puts the calibrated pixel threshold at mid-scale; predicted defect = map above it.
    """

    def __init__(self, dirpath: str, per_type: int = 4) -> None:
        self.dirpath = Path(dirpath)
        self.per_type = per_type
        self._rows: dict[str, list[np.ndarray]] = defaultdict(list)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rows = defaultdict(list)

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if outputs is None or not trainer.is_global_zero:
            return
        cal = pl_module.model.calibration
        for j, defect in enumerate(batch.get("defect_type", ["test"] * len(batch["image"]))):
            if len(self._rows[defect]) >= self.per_type:
                continue
            fmap = outputs.maps[j].detach().float().cpu().numpy()
            if bool(cal.fitted):
                low, thr = float(cal.low), float(cal.pixel_threshold)
                heat, mask = (fmap - low) / max(2 * (thr - low), 1e-12), fmap > thr
            else:
                heat, mask = (fmap - fmap.min()) / max(float(np.ptp(fmap)), 1e-12), None
            image = (
                batch["image"][j].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255
            )
            truth = batch["mask"][j, 0].detach().cpu().numpy() > 0
            self._rows[defect].append(overlay_panel(image.astype(np.uint8), heat, mask, truth))

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._rows or not trainer.is_global_zero:
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        for defect, rows in self._rows.items():
            grid = np.concatenate(rows, axis=0)  # (n * H, 3W, 3)
            Image.fromarray(grid).save(self.dirpath / f"{defect}.png")
