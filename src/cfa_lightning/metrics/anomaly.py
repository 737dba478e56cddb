"""Image- and pixel-level anomaly metrics of ``docs/method.md`` ("Evaluation protocol"), in one
object.

AUROC and the precision-recall curve come from torchmetrics (exact curves,
``thresholds=None``); AUPRO from :mod:`cfa_lightning.metrics.aupro`. F1 is the
best F1 over every threshold of the exact precision-recall curve, and the
threshold returned with it is in the model's own score units (a sample is
anomalous when its score is >= the threshold).

torchmetrics treats scores outside [0, 1] as logits and applies a sigmoid to
them, batch by batch; the sigmoid would merge large anomaly scores into ties
(float32 sigmoid is 1.0 above ~17). So the raw scores are stored here and mapped
to [0, 1] by an order-preserving map once, at ``compute``.
"""

from __future__ import annotations

import math
import warnings

import torch
import torchmetrics
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc, binary_precision_recall_curve
from torchmetrics.utilities.data import dim_zero_cat

from cfa_lightning.metrics.aupro import (
    as_bool_mask,
    as_image_stack,
    compute_aupro,
    gather_cpu_tensors,
)


def _to_unit_interval(scores: Tensor) -> Tensor:
    """Map scores into [0, 1] without changing their order or merging distinct values."""
    low, high = float(scores.min()), float(scores.max())
    if low >= 0.0 and high <= 1.0:
        return scores
    if low >= 0.0:
        # Division by a power of two is exact in floating point: no new ties.
        return scores / 2.0 ** math.ceil(math.log2(high))
    return (scores.double() - low) / max(high - low, 1e-300)


def is_anomalous(scores: Tensor, threshold: float | Tensor) -> Tensor:
    """The one decision rule, for image scores and map pixels alike (tensors or numpy arrays):
    anomalous when the score is >= the threshold, the rule of the F1 thresholds below."""
    return scores >= threshold


def _best_f1(scores: Tensor, labels: Tensor) -> tuple[float, float]:
    """Best F1 over all thresholds of the exact PR curve and its threshold, in score units."""
    unit_scores = _to_unit_interval(scores)
    precision, recall, thresholds = binary_precision_recall_curve(
        unit_scores, labels, thresholds=None, validate_args=False
    )
    # precision/recall end with the threshold-free point (1, 0); drop it.
    precision, recall = precision[:-1].double(), recall[:-1].double()
    f1 = 2 * precision * recall / (precision + recall)
    f1 = torch.nan_to_num(f1, nan=0.0)  # precision = recall = 0
    best = int(torch.argmax(f1))  # thresholds ascend: ties go to the lowest threshold
    # The raw score at that threshold: the smallest score still flagged anomalous.
    threshold = float(scores[unit_scores >= thresholds[best]].min())
    return float(f1[best]), threshold


def _auroc(scores: Tensor, labels: Tensor) -> float:
    return float(
        binary_auroc(_to_unit_interval(scores), labels, thresholds=None, validate_args=False)
    )


class AnomalyMetrics(torchmetrics.Metric):
    """Image AUROC / F1 and pixel AUROC / AUPRO / F1 of an anomaly detector.

    ``compute()`` returns a dict with ``image_AUROC``, ``image_F1``,
    ``image_threshold`` and, when ``pixel``, ``pixel_AUROC``, ``pixel_AUPRO``,
    ``pixel_F1``, ``pixel_threshold``. A metric that is undefined on the data
    seen (AUROC or AUPRO with one class only, F1 with no anomalous sample) is
    left out, with one warning that says why.

    States are kept on the CPU (GPU memory does not grow with the test set) and
    gathered across processes under DDP. All maps must share one (H, W). Call
    ``update``, not ``forward``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, pixel: bool = True, fpr_limit: float = 0.3, **kwargs: object) -> None:
        kwargs.setdefault("dist_sync_fn", gather_cpu_tensors)
        super().__init__(**kwargs)
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must lie in (0, 1]; got {fpr_limit}")
        self.pixel = pixel
        self.fpr_limit = fpr_limit
        self.add_state("image_scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("maps", default=[], dist_reduce_fx="cat")
        self.add_state("masks", default=[], dist_reduce_fx="cat")

    def update(
        self,
        image_scores: Tensor,
        labels: Tensor,
        maps: Tensor | None = None,
        masks: Tensor | None = None,
        pixel_rows: Tensor | None = None,
    ) -> None:
        """Store a batch: image_scores (B,), labels (B,) 0/1, maps and masks (B, H, W).

        ``pixel_rows`` (B,) bool: the images whose maps enter the pixel metrics (all if None),
        e.g. not an anomalous image that comes without a mask.
        """
        image_scores = image_scores.detach().to("cpu", torch.float32).reshape(-1)  # (B,)
        labels = as_bool_mask(labels.detach().to("cpu")).reshape(-1)  # (B,)
        if image_scores.shape != labels.shape:
            raise ValueError(
                f"image_scores and labels must both be (B,); got {tuple(image_scores.shape)} "
                f"and {tuple(labels.shape)}"
            )
        if not torch.isfinite(image_scores).all():
            raise ValueError("image scores contain NaN or inf values; check the model's scoring")
        self.image_scores.append(image_scores)
        self.labels.append(labels)
        if not self.pixel:
            return
        if maps is None or masks is None:
            raise ValueError(
                "AnomalyMetrics(pixel=True) needs maps and masks in update(); pass both "
                "(all-zero masks for normal images) or build it with pixel=False"
            )
        maps, masks = as_image_stack(maps, masks)
        if maps.shape[0] != image_scores.shape[0]:
            raise ValueError(
                f"{maps.shape[0]} maps for {image_scores.shape[0]} image scores in one batch"
            )
        if pixel_rows is not None:
            rows = pixel_rows.detach().to("cpu", torch.bool).reshape(-1)  # (B,)
            maps, masks = maps[rows], masks[rows]
        self.maps.append(maps)
        self.masks.append(masks)

    def compute(self) -> dict[str, float]:
        results: dict[str, float] = {}
        skipped: list[str] = []

        scores, labels = dim_zero_cat(self.image_scores), dim_zero_cat(self.labels)
        n_anomalous = int(labels.sum())
        n_images = labels.numel()
        if 0 < n_anomalous < n_images:
            results["image_AUROC"] = _auroc(scores, labels)
        elif n_anomalous == 0:
            skipped.append(f"image_AUROC skipped: the test set has only normal images ({n_images})")
        else:
            skipped.append(
                f"image_AUROC skipped: the test set has only anomalous images ({n_images})"
            )
        if n_anomalous > 0:
            results["image_F1"], results["image_threshold"] = _best_f1(scores, labels)
        else:
            skipped.append("image_F1 skipped: no anomalous image")

        if self.pixel:
            results.update(self._compute_pixel(skipped))

        if skipped:
            warnings.warn("AnomalyMetrics: " + "; ".join(skipped), stacklevel=2)
        return results

    def _compute_pixel(self, skipped: list[str]) -> dict[str, float]:
        results: dict[str, float] = {}
        maps, masks = dim_zero_cat(self.maps), dim_zero_cat(self.masks)  # (N, H, W)
        n_anomalous = int(masks.sum())
        if n_anomalous == 0:
            skipped.append(
                "pixel_AUROC, pixel_AUPRO, pixel_F1 skipped: no anomalous pixel in the masks"
            )
            return results
        if n_anomalous == masks.numel():
            skipped.append("pixel_AUROC, pixel_AUPRO skipped: no normal pixel in the masks")
        else:
            results["pixel_AUROC"] = _auroc(maps.reshape(-1), masks.reshape(-1))
            results["pixel_AUPRO"] = compute_aupro(maps, masks, self.fpr_limit)
        results["pixel_F1"], results["pixel_threshold"] = _best_f1(
            maps.reshape(-1), masks.reshape(-1)
        )
        return results
