"""Decision thresholds and score normalisation, fitted on validation images, stored as buffers.

The rule (documented in README, "Calibrated scores"):
- validation images are all normal (the default split): both thresholds are the `quantile`
  (default 0.99) of the normal images' scores, i.e. of their most anomalous pixel. An image is
  flagged when its score exceeds what 99% of normal images reach; a pixel when it exceeds the
  same level, so an image is flagged exactly when its predicted mask is not empty;
- validation images include anomalies (a user-given split): each threshold is the one with the
  best F1 on that split (image scores vs labels, pixel scores vs masks when masks exist).
Normalised score = clamp(0.5 + 0.5 * (s - threshold) / (threshold - low), 0, 1), `low` being the
lowest map value seen on validation: `low` -> 0, the threshold -> 0.5.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Calibration(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("image_threshold", torch.tensor(float("nan")))
        self.register_buffer("pixel_threshold", torch.tensor(float("nan")))
        self.register_buffer("low", torch.tensor(0.0))
        self.register_buffer("fitted", torch.tensor(False))

    @torch.no_grad()
    def fit(
        self,
        image_scores: Tensor,
        map_low: float,
        quantile: float = 0.99,
        f1_thresholds: dict[str, float] | None = None,
    ) -> None:
        """image_scores: (N,) validation image scores; f1_thresholds from a split with anomalies."""
        if image_scores.numel() == 0:
            raise ValueError("cannot calibrate thresholds on an empty validation split")
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"model.threshold_quantile must be in (0, 1], got {quantile}")
        normal_level = float(torch.quantile(image_scores.double().cpu(), quantile))
        f1 = f1_thresholds or {}
        image_thr = f1.get("image_threshold", normal_level)
        pixel_thr = f1.get(
            "pixel_threshold", image_thr if "image_threshold" in f1 else normal_level
        )
        self.image_threshold.fill_(image_thr)
        self.pixel_threshold.fill_(pixel_thr)
        self.low.fill_(min(map_low, image_thr, pixel_thr))
        self.fitted.fill_(True)

    def normalize(self, scores: Tensor, threshold: Tensor) -> Tensor:
        """Raw scores -> [0, 1] with `threshold` at 0.5 (identity-free: needs a fitted calibration)."""
        spread = (threshold - self.low).clamp_min(1e-12)
        return (0.5 + 0.5 * (scores - threshold) / spread).clamp(0.0, 1.0)
