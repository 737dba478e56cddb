"""Decision thresholds and score normalisation, fitted on validation images, stored as buffers.

The rule (docs/deployment.md, "Calibrated thresholds"):
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

from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from ..distributed import gather_objects

MIN_CALIBRATION_IMAGES = 20  # below this, a warning that the thresholds are unreliable
THRESHOLD_RULES = ("auto", "quantile", "f1")


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


class ValidationCalibrator:
    """Fits a model's ``Calibration`` at the end of every validation epoch, across ranks.

    ``rule`` (``model.threshold_rule``): ``auto`` (default) takes the quantile rule on the normal
    images unless the split holds real (not synthetic) anomalies, where it takes the best-F1
    thresholds; ``quantile`` always takes the quantile rule, ``f1`` the F1 optimum whenever the
    split has anomalies, synthetic ones included.
    """

    def __init__(self, calibration: Calibration, quantile: float, rule: str) -> None:
        if rule not in THRESHOLD_RULES:
            raise ValueError(f"model.threshold_rule={rule!r}; choose auto, quantile or f1")
        self.calibration, self.quantile, self.rule = calibration, quantile, rule
        self.n_images = 0  # normal images behind the latest thresholds
        self.start_epoch()

    def start_epoch(self) -> None:
        self._scores: list[Tensor] = []
        self._low = float("inf")

    def add_normal(self, image_scores: Tensor, maps: Tensor) -> None:
        """A batch of normal validation images: their scores (B,) and maps (B, H, W)."""
        if len(image_scores) == 0:  # a batch of anomalies only
            return
        self._scores.append(image_scores.detach())
        self._low = min(self._low, float(maps.min()))

    def fit(self, module: Any, val_results: dict[str, float], real_anomaly: bool) -> None:
        """Thresholds from this epoch's normal images on every rank; ``val_results``: the
        validation metrics with their best-F1 thresholds (empty without anomalies)."""
        use_f1 = self.rule == "f1" or (self.rule == "auto" and real_anomaly)
        f1 = {k: v for k, v in val_results.items() if k.endswith("_threshold")} if use_f1 else {}
        local = torch.cat(self._scores).cpu() if self._scores else torch.zeros(0)
        scores = torch.cat(gather_objects(local)).flatten()  # every rank, any count
        if scores.numel() == 0:
            return
        low = float(module.all_gather(torch.tensor(self._low, device=module.device)).min())
        self.calibration.fit(scores, low, self.quantile, f1)
        self.n_images = scores.numel()
        module.log("val/image_threshold", self.calibration.image_threshold)
        module.log("val/pixel_threshold", self.calibration.pixel_threshold)

    def warn_if_unreliable(self) -> None:
        if not bool(self.calibration.fitted):
            rank_zero_warn(
                "no validation images, so no calibrated thresholds: predictions will carry raw "
                "scores only. Keep data.val_fraction > 0 (or give a validation folder)."
            )
        elif self.n_images < MIN_CALIBRATION_IMAGES:
            rank_zero_warn(
                f"thresholds were calibrated on only {self.n_images} validation images: the "
                "tail of the normal scores is barely seen, so expect false alarms. Raise "
                "data.val_fraction or give a larger validation folder."
            )
