"""The paired resize + centre-crop transform (image reading: images.py, torch-free).

Images leave this module as float32 tensors in [0, 1] and are *not* normalised:
the model normalises with its backbone's own mean/std. Masks leave it as
float32 tensors with values {0, 1} (binarised as value > 127 after a
nearest-neighbour resize, as in "Evaluation protocol" of ``docs/method.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..geometry import crop_box
from ..images import to_mask_l, to_rgb
from ..sizes import as_size

__all__ = ["ImageMaskTransform"]

MASK_THRESHOLD = 127  # mask pixel is "defect" when its 8-bit value is > 127


class ImageMaskTransform:
    """Resize (bilinear, antialiased) to ``image_size``, then optionally centre-crop.

    ``image_size`` / ``crop_size``: an int for a square, or an (H, W) pair. The
    mask gets the same geometry with nearest-neighbour resizing.
    """

    def __init__(
        self,
        image_size: int | Sequence[int] = 256,
        crop_size: int | Sequence[int] | None = None,
    ) -> None:
        self.image_size = as_size(image_size, "data.image_size")
        self.crop_size = None if crop_size is None else as_size(crop_size, "data.crop_size")
        if self.crop_size is not None and (
            self.crop_size[0] > self.image_size[0] or self.crop_size[1] > self.image_size[1]
        ):
            raise ValueError(
                f"data.crop_size {self.crop_size} is larger than data.image_size "
                f"{self.image_size} (both (H, W)); choose a crop no larger than the resize, "
                "e.g. image_size=256 crop_size=224, or set crop_size=null."
            )

    @property
    def output_size(self) -> tuple[int, int]:
        """(H, W) of the tensors this transform returns."""
        return self.crop_size or self.image_size

    def __call__(
        self, image: Image.Image, mask: Image.Image | None = None
    ) -> tuple[Tensor, Tensor]:
        image = to_rgb(image)
        x = TF.to_dtype(TF.to_image(image), torch.float32, scale=True)  # (3, H0, W0) in [0, 1]
        x = TF.resize(
            x, list(self.image_size), interpolation=InterpolationMode.BILINEAR, antialias=True
        )  # (3, H, W)
        # Antialiased bilinear resizing can overshoot [0, 1] slightly at sharp edges.
        x = x.clamp_(0.0, 1.0)

        if mask is None:
            m = torch.zeros(1, *self.image_size, dtype=torch.uint8)  # (1, H, W)
        else:
            m = TF.to_image(to_mask_l(mask))  # (1, H0, W0) uint8
            m = TF.resize(m, list(self.image_size), interpolation=InterpolationMode.NEAREST)

        if self.crop_size is not None:  # the crop box of geometry.py, as Predictor and deploy
            (top, left), (h, w) = crop_box(self.image_size, self.crop_size), self.crop_size
            x = x[:, top : top + h, left : left + w]  # (3, h, w)
            m = m[:, top : top + h, left : left + w]  # (1, h, w)

        m = (m.as_subclass(Tensor) > MASK_THRESHOLD).to(torch.float32)  # (1, H, W) in {0, 1}
        return x.as_subclass(Tensor).contiguous(), m.contiguous()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, crop_size={self.crop_size})"
