"""Score in-memory images with a trained model: PIL images, numpy arrays or tensors in,
raw and normalised scores, a decision, an anomaly map and a defect mask out.

    from cfa_lightning.inference import Predictor
    predictor = Predictor.from_checkpoint("outputs/train/<run>/checkpoints/last.ckpt")
    result = predictor.predict(PIL.Image.open("part.png"))
    result.score, result.normalized_score, result.is_anomalous, result.anomaly_map, result.mask
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .deploy import Prediction, to_prediction
from .geometry import preprocess
from .images import ImageLike, to_pil
from .models.cfa import CFA
from .sizes import trained_sizes


class Predictor:
    """Resize (and crop) like training, score in batches, map back to each image's own size: the
    geometry and decisions of the exported model's `deploy.Inferencer`, with PyTorch's model."""

    def __init__(
        self,
        model: CFA,
        image_size: int | list[int] | None = None,
        crop_size: int | list[int] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.resize, self.crop = trained_sizes(
            {"image_size": image_size, "crop_size": crop_size}, model.input_size
        )
        if tuple(self.crop or self.resize) != tuple(model.input_size):
            raise ValueError(
                f"image_size/crop_size give {self.crop or self.resize} but the model was "
                f"trained at {model.input_size}"
            )

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> Predictor:
        """Load a training checkpoint; resize and crop are read from the data config saved in it."""
        from .models.lit_module import CFALitModule

        ckpt = load_checkpoint(path)
        module = CFALitModule.from_checkpoint_dict(ckpt, path)
        resize, crop = trained_sizes(
            ckpt.get("datamodule_hyper_parameters") or {}, module.model.input_size
        )
        return cls(module.model, list(resize), list(crop) if crop else None, device)

    @property
    def calibrated(self) -> bool:
        return bool(self.model.calibration.fitted)

    def predict(self, image: ImageLike) -> Prediction:
        return self.predict_batch([image])[0]

    @torch.inference_mode()
    def predict_batch(self, images: list[ImageLike]) -> list[Prediction]:
        pils = [to_pil(im) for im in images]
        batch = np.stack([preprocess(im, self.resize, self.crop) for im in pils])  # (B, 3, h, w)
        out = self.model(torch.from_numpy(batch).to(self.device))
        cal = self.model.calibration
        thresholds = None
        normalized = torch.full_like(out.image_scores, float("nan"))
        if self.calibrated:
            thresholds = (float(cal.image_threshold), float(cal.pixel_threshold))
            normalized = cal.normalize(out.image_scores, cal.image_threshold)
        maps = out.maps.float().cpu().numpy()  # (B, h, w)
        rows = zip(pils, out.image_scores.tolist(), normalized.tolist(), maps, strict=True)
        return [
            to_prediction(score, norm, fmap, pil.size[::-1], self.resize, self.crop, thresholds)
            for pil, score, norm, fmap in rows
        ]
