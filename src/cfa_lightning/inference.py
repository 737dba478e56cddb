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
import torch.nn.functional as F
from PIL import Image

from . import deploy
from .checkpoint import load_checkpoint
from .data.transforms import ImageMaskTransform
from .deploy import Prediction
from .metrics import is_anomalous
from .models.cfa import CFA

ImageLike = Image.Image | np.ndarray | torch.Tensor | str | Path


def to_pil(image: ImageLike) -> Image.Image:
    """Any supported image -> 8-bit RGB PIL image: a (C, H, W) or (H, W, C) tensor, or what
    `deploy.to_pil` takes (path, PIL image, numpy array; grayscale, RGBA, 16-bit, float)."""
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3, 4):  # (C, H, W) -> (H, W, C)
            t = t.permute(1, 2, 0)
        image = t.numpy()
    return deploy.to_pil(image)


class Predictor:
    """Resize (and crop) like training, score in batches, map back to each image's own size."""

    def __init__(
        self,
        model: CFA,
        image_size: int | list[int] | None = None,
        crop_size: int | list[int] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.transform = ImageMaskTransform(image_size or list(model.input_size), crop_size)
        if tuple(self.transform.output_size) != tuple(model.input_size):
            raise ValueError(
                f"image_size/crop_size give {self.transform.output_size} but the model was "
                f"trained at {model.input_size}"
            )

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> Predictor:
        """Load a training checkpoint; resize and crop are read from the data config saved in it."""
        from .models.lit_module import CFALitModule

        ckpt = load_checkpoint(path)
        module = CFALitModule.from_checkpoint_dict(ckpt, path)
        data = ckpt.get("datamodule_hyper_parameters", {})
        return cls(module.model, data.get("image_size"), data.get("crop_size"), device)

    @property
    def calibrated(self) -> bool:
        return bool(self.model.calibration.fitted)

    def predict(self, image: ImageLike) -> Prediction:
        return self.predict_batch([image])[0]

    @torch.inference_mode()
    def predict_batch(self, images: list[ImageLike]) -> list[Prediction]:
        pils = [to_pil(im) for im in images]
        batch = torch.stack([self.transform(im, None)[0] for im in pils]).to(self.device)
        out = self.model(batch)
        cal = self.model.calibration
        results = []
        for pil, score, fmap in zip(pils, out.image_scores, out.maps, strict=True):
            raw = self._to_original(fmap, pil.size[::-1])  # (H0, W0)
            if self.calibrated:
                norm = float(cal.normalize(score, cal.image_threshold))
                decision = bool(is_anomalous(score, cal.image_threshold))
                mask = is_anomalous(raw, float(cal.pixel_threshold)).numpy()
            else:
                norm, decision, mask = float("nan"), None, None
            results.append(
                Prediction(float(score), norm, decision, raw.numpy().astype(np.float32), mask)
            )
        return results

    def _to_original(self, fmap: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Map (h, w) at model resolution -> (H0, W0); outside a centre crop: the lowest value."""
        h0, w0 = size
        fmap = fmap.float().cpu()
        crop = self.transform.crop_size
        if crop is None:
            return F.interpolate(
                fmap[None, None], size=(h0, w0), mode="bilinear", align_corners=False
            )[0, 0]
        rh, rw = self.transform.image_size
        top, left = (rh - crop[0]) // 2, (rw - crop[1]) // 2  # torchvision's centre-crop offsets
        y0, x0 = round(top * h0 / rh), round(left * w0 / rw)
        y1, x1 = round((top + crop[0]) * h0 / rh), round((left + crop[1]) * w0 / rw)
        full = torch.full((h0, w0), float(fmap.min()))
        full[y0:y1, x0:x1] = F.interpolate(
            fmap[None, None], size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False
        )[0, 0]
        return full
