"""W&B media for the test set: overlays, a per-image table and score histograms (rank 0 logs).

Does nothing unless a ``WandbLogger`` is attached, so it can sit in the default callbacks.
Under DDP every rank records its real samples (sampler padding dropped); rank 0 gathers them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from PIL import Image, ImageDraw
from pytorch_lightning.loggers import WandbLogger

from ..distributed import PaddingFilter, current_eval_loader, gather_objects
from ..metrics import is_anomalous
from ..visualize import HeatScale, colormap

CLASS_LABELS = {0: "normal", 1: "defect"}


def sample_indices(n: int, k: int) -> list[int]:
    """``k`` dataset indices spread evenly over ``range(n)``: a fixed sample, whatever the ranks."""
    if n <= 0 or k <= 0:
        return []
    m = min(k, n)
    return sorted({round(i * (n - 1) / max(m - 1, 1)) for i in range(m)})


def histogram_image(
    scores: np.ndarray, labels: np.ndarray, threshold: float | None, size=(640, 360), bins: int = 30
) -> Image.Image:
    """Score histograms of normal (blue) and anomalous (red) images, threshold as a black line."""
    width, height = size
    margin = 40
    lo, hi = float(scores.min()), float(scores.max())
    if threshold is not None:
        lo, hi = min(lo, threshold), max(hi, threshold)
    hi = hi if hi > lo else lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    counts = [np.histogram(scores[labels == c], bins=edges)[0] for c in (0, 1)]
    top = max(1, max(int(c.max(initial=0)) for c in counts))
    canvas = Image.new("RGBA", size, (255, 255, 255, 255))
    plot_w, plot_h = width - 2 * margin, height - 2 * margin

    def x_of(value: float) -> float:
        return margin + (value - lo) / (hi - lo) * plot_w

    for count, colour in zip(counts, ((40, 90, 220, 140), (220, 40, 40, 140)), strict=True):
        layer = Image.new("RGBA", size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(layer)
        for i, c in enumerate(count):
            if c:
                y = height - margin - c / top * plot_h
                draw.rectangle(
                    [x_of(edges[i]), y, x_of(edges[i + 1]), height - margin], fill=colour
                )
        canvas = Image.alpha_composite(canvas, layer)
    draw = ImageDraw.Draw(canvas)
    draw.line([margin, height - margin, width - margin, height - margin], fill="black")
    if threshold is not None:
        x = x_of(threshold)
        draw.line([x, margin - 10, x, height - margin], fill="black", width=2)
        draw.text((x + 4, margin - 10), f"threshold {threshold:.3g}", fill="black")
    draw.text((margin, height - margin + 8), f"{lo:.3g}", fill="black")
    draw.text((width - margin - 40, height - margin + 8), f"{hi:.3g}", fill="black")
    normal, anomalous = int((labels == 0).sum()), int((labels == 1).sum())
    counts = f"normal (blue, n={normal}), anomalous (red, n={anomalous})"
    draw.text((margin, 8), f"image score: {counts}; max count {top}", fill="black")
    return canvas.convert("RGB")


class WandbTestMedia(pl.Callback):
    """Logs, after the test epoch, to the W&B run of a ``WandbLogger``:

    - ``test/overlays``: ``num_images`` test images (a fixed, evenly spaced sample of the test
      set), each the image beside its anomaly map over the image, in the model's fixed colour
      scale (``visualize.HeatScale``); ground truth and the predicted mask (map >= the calibrated
      pixel threshold stored in the model, not a threshold fitted on the test set) are W&B masks,
      toggled in the UI, or left out with ``masks=False``;
    - ``test/per_image``: a table of every test image (path, defect type, label, score);
    - ``test/score_histogram``: normal vs anomalous image scores with the image threshold.
    """

    def __init__(
        self, num_images: int = 8, masks: bool = True, table: bool = True, histogram: bool = True
    ) -> None:
        self.num_images = num_images
        self.masks = masks
        self.table = table
        self.histogram = histogram
        self._filter = PaddingFilter()
        self._wanted: set[int] = set()
        self._rows: list[tuple] = []
        self._samples: list[dict[str, Any]] = []

    @staticmethod
    def _wandb_logger(trainer: pl.Trainer) -> WandbLogger | None:
        return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        logger = self._wandb_logger(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        # The run summary holds the best value where "best" means something; test metrics are
        # logged once, so their summary is that value.
        run = logger.experiment
        run.define_metric("val/loss", summary="min")
        run.define_metric("train/loss_epoch", summary="min")

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rows, self._samples = [], []
        loader = current_eval_loader(trainer)
        self._filter = PaddingFilter(loader)
        n = len(loader.dataset) if loader is not None and hasattr(loader, "dataset") else 0
        self._wanted = set(sample_indices(n, self.num_images))

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._wandb_logger(trainer) is None or outputs is None:
            return
        scores = outputs.image_scores.detach().float().cpu()  # (B,)
        keep = self._filter.keep(len(scores))
        if keep is None:  # a sampler that gives no indices: number the samples as they come
            keep = list(range(self._filter.position - len(scores), self._filter.position))
        masks = batch.get("mask")  # (B, 1, H, W); a data set without masks may have none
        paths = batch.get("image_path", [""] * len(scores))
        defects = batch.get("defect_type", [""] * len(scores))
        for j, index in enumerate(keep):
            label = int(batch["label"][j])
            self._rows.append((index, str(paths[j]), str(defects[j]), label, float(scores[j])))
            if index in self._wanted:
                image = batch["image"][j].detach().float().clamp(0, 1).permute(1, 2, 0)  # (H, W, 3)
                hw = image.shape[:2]
                fmap = outputs.maps[j].detach().float().cpu().reshape(hw).numpy()  # (H, W)
                if masks is None:
                    mask = np.zeros(hw, dtype=bool)
                else:
                    mask = masks[j].detach().cpu().reshape(hw).numpy() > 0  # (H, W)
                sample = {
                    "index": index,
                    "path": str(paths[j]),
                    "defect": str(defects[j]),
                    "score": float(scores[j]),
                    "label": label,
                    "image": (image.cpu().numpy() * 255).astype(np.uint8),
                    "map": fmap,
                    "mask": mask,
                }
                self._samples.append(sample)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = self._wandb_logger(trainer)
        if logger is None:
            return
        rows = [r for part in gather_objects(self._rows) for r in part]
        samples = [s for part in gather_objects(self._samples) for s in part]
        self._rows, self._samples = [], []
        if not trainer.is_global_zero:
            return
        rows = sorted({r[0]: r for r in rows}.values())  # one row per dataset index
        samples = sorted({s["index"]: s for s in samples}.values(), key=lambda s: s["index"])
        media = self._media(rows, samples, pl_module.model.calibration)
        if media:
            logger.experiment.log(media)

    def _media(self, rows: list[tuple], samples: list[dict], calibration) -> dict[str, Any]:
        import wandb

        fitted = bool(calibration.fitted)

        media: dict[str, Any] = {}
        if self.table and rows:
            media["test/per_image"] = wandb.Table(
                columns=["index", "path", "defect_type", "label", "score"],
                data=[list(r) for r in rows],
            )
        if self.histogram and rows:
            scores = np.array([r[4] for r in rows])
            labels = np.array([r[3] for r in rows])
            media["test/score_histogram"] = wandb.Image(
                histogram_image(
                    scores, labels, float(calibration.image_threshold) if fitted else None
                ),
                caption="image scores, normal vs anomalous, with the calibrated threshold",
            )
        if samples:
            scale = HeatScale.from_calibration(calibration) or HeatScale.spanning(
                [s["map"] for s in samples]  # uncalibrated: one scale for the whole sample
            )
            threshold = float(calibration.pixel_threshold) if fitted else None
            media["test/overlays"] = [self._overlay(s, scale, threshold) for s in samples]
        return media

    def _overlay(self, sample: dict, scale: HeatScale, pixel_threshold: float | None):
        import wandb

        heat = colormap(scale(sample["map"]))
        blended = (0.5 * sample["image"] + 0.5 * heat).astype(np.uint8)
        panel = np.concatenate([sample["image"], blended], axis=1)  # (H, 2W, 3): image | map
        caption = (
            f"{Path(sample['path']).name} ({sample['defect']}), score {sample['score']:.4g}, "
            f"label {sample['label']}; colours {scale.low:.3g} (blue) to {scale.high:.3g} "
            "(red), clipped"
        )
        masks = None
        if self.masks:
            gt = np.tile(sample["mask"], (1, 2)).astype(np.uint8)
            masks = {"ground_truth": {"mask_data": gt, "class_labels": CLASS_LABELS}}
            if pixel_threshold is not None:
                predicted = is_anomalous(sample["map"], pixel_threshold)
                predicted = np.tile(predicted, (1, 2)).astype(np.uint8)
                masks["prediction"] = {"mask_data": predicted, "class_labels": CLASS_LABELS}
        return wandb.Image(panel, caption=caption, masks=masks)
