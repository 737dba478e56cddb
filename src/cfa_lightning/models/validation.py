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


class ValidationEpoch:
    """The normal images' loss and score sums, whether anomalies (real ones among them) were
    seen, the sampler's padded duplicates, and the epoch's wall time."""

    def __init__(self, loader: Any = None) -> None:
        self.filter = PaddingFilter(loader)  # drops the duplicates a DistributedSampler pads in
        self.loss_sum = self.score_sum = 0.0
        self.normal = 0
        self.anomaly = self.real_anomaly = False
        self.start = time.perf_counter()

    def add_normal(self, loss: Tensor, image_scores: Tensor) -> None:
        """The loss (mean) and scores (B,) of a batch's normal images."""
        self.loss_sum += float(loss) * len(image_scores)
        self.score_sum += float(image_scores.sum())
        self.normal += len(image_scores)

    def add_labels(self, labels: Tensor, synthetic: Tensor) -> None:
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
        return time.perf_counter() - self.start


def any_rank(module: Any, flag: bool) -> bool:
    """``flag`` OR-ed over all ranks (the value itself when not distributed)."""
    return bool(module.all_gather(torch.tensor(int(flag), device=module.device)).any())
