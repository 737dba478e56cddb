"""One validation epoch's bookkeeping, reduced over ranks at its end.

Every rank takes part in every reduction, also one whose share of the split holds no anomaly or
no normal image: under a DistributedSampler that happens whenever the split is small.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from ..distributed import PaddingFilter
from ..metrics import AnomalyMetrics
from .maps import CFAOutput


class ValidationEpoch:
    """The normal images' loss and score sums, the selection metrics' updates, whether anomalies
    (real ones among them) were seen, the sampler's padded duplicates, and the epoch's wall time.

    ``pixel_stride``: pixel metrics on every s-th pixel per axis (model.val_pixel_stride; the
    exact curves would dominate a validation epoch); test metrics use every pixel.
    """

    def __init__(self, metrics: AnomalyMetrics, pixel_stride: int) -> None:
        self.metrics, self.pixel_stride = metrics, pixel_stride
        self.start()

    def start(self, loader: Any = None) -> None:
        """A new epoch over ``loader`` (its sampler tells the padded duplicates apart)."""
        self.filter = PaddingFilter(loader)  # drops the duplicates a DistributedSampler pads in
        self.loss_sum = self.score_sum = 0.0
        self.normal = 0
        self.anomaly = self.real_anomaly = False
        self.started = time.perf_counter()

    def add(
        self, losses: Tensor, out: CFAOutput, labels: Tensor, masks: Tensor, synthetic: Tensor
    ) -> None:
        """A batch: each image's loss (B,), scores (B,) and maps (B, H, W), labels (B,), masks
        (B, H, W) and which anomalies are synthetic (B,). The loss and score sums take the
        normal images only; an anomalous image with an empty mask (a real defect from
        data.val_dir comes without one) counts in the image metrics only."""
        normal = labels == 0  # (B,)
        self.loss_sum += float(losses[normal].sum())
        self.score_sum += float(out.image_scores[normal].sum())
        self.normal += int(normal.sum())
        pixel_rows = normal | masks.flatten(1).any(dim=1)  # (B,)
        s = self.pixel_stride
        maps, masks = out.maps[:, ::s, ::s], masks[:, ::s, ::s]
        self.metrics.update(out.image_scores, labels, maps, masks, pixel_rows=pixel_rows)
        self.anomaly |= bool(labels.any())
        self.real_anomaly |= bool((labels.bool() & ~synthetic.bool()).any())

    def end(self, module: Any) -> tuple[bool, bool]:
        """Logs val/loss and val/score_mean over all ranks' normal images; returns whether any
        rank saw an anomaly, and a real (not synthetic) one."""
        sums = torch.tensor([self.loss_sum, self.score_sum, self.normal], device=module.device)
        loss_sum, score_sum, n_normal = module.trainer.strategy.reduce(sums, reduce_op="sum")
        if n_normal > 0:  # the same on every rank
            module.log("val/loss", loss_sum / n_normal, prog_bar=True)
            module.log("val/score_mean", score_sum / n_normal)
        return any_rank(module, self.anomaly), any_rank(module, self.real_anomaly)

    def seconds(self) -> float:
        return time.perf_counter() - self.started


def any_rank(module: Any, flag: bool) -> bool:
    """``flag`` OR-ed over all ranks (the value itself when not distributed)."""
    return bool(module.all_gather(torch.tensor(int(flag), device=module.device)).any())
