"""The map-style dataset over scanned samples: decoded, resized images and masks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..images import load_mask, load_rgb
from .layout import Sample
from .transforms import ImageMaskTransform

__all__ = ["AnomalyDataset"]


class AnomalyDataset(Dataset):
    """Samples -> dicts with ``image`` (3, H, W), ``mask`` (1, H, W), ``label``, path, defect.

    ``cache=True`` keeps each decoded, resized image and mask in memory after its first use
    (about 0.8 MB per image at 256 px): later epochs skip decoding. Each worker process holds
    its own cache, so use it with ``num_workers=0`` or persistent workers.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: ImageMaskTransform | None = None,
        cache: bool = False,
    ):
        self.samples = [Sample(*s) for s in samples]
        self.transform = transform or ImageMaskTransform()
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        path, label, mask_path, defect_type = self.samples[index]
        if self._cache is not None and index in self._cache:
            x, m = self._cache[index]
        else:
            x, m = self._load(path, mask_path)
            if self._cache is not None:
                self._cache[index] = (x, m)
        return {
            "image": x,
            "mask": m,
            "label": torch.tensor(int(label), dtype=torch.int64),
            "image_path": str(path),
            "defect_type": defect_type,
        }

    def _load(self, path: Path, mask_path: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
        image = load_rgb(path)
        mask = None
        if mask_path is not None:
            mask = load_mask(mask_path)
            if mask.size != image.size:
                raise ValueError(
                    f"mask {mask_path} is {mask.size[0]}x{mask.size[1]} (WxH) but its image "
                    f"{path} is {image.size[0]}x{image.size[1]}; masks must match their image "
                    "pixel for pixel. Fix or regenerate the mask."
                )
        return self.transform(image, mask)  # (3, H, W) float [0, 1], (1, H, W) float {0, 1}
