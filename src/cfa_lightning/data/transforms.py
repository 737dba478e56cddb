"""Image/mask loading and the paired resize + centre-crop transform.

Images leave this module as float32 tensors in [0, 1] and are *not* normalised:
the model normalises with its backbone's own mean/std. Masks leave it as
float32 tensors with values {0, 1} (binarised as value > 127 after a
nearest-neighbour resize, as in the evaluation protocol of ``cfa_spec.md``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..sizes import as_size

__all__ = ["ImageMaskTransform", "load_mask", "load_rgb", "to_mask_l", "to_rgb"]

MASK_THRESHOLD = 127  # mask pixel is "defect" when its 8-bit value is > 127

# Modes whose samples are 16-bit unsigned integers (0..65535).
_UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


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

        if self.crop_size is not None:
            x = TF.center_crop(x, list(self.crop_size))  # (3, h, w)
            m = TF.center_crop(m, list(self.crop_size))  # (1, h, w)

        m = (m.as_subclass(Tensor) > MASK_THRESHOLD).to(torch.float32)  # (1, H, W) in {0, 1}
        return x.as_subclass(Tensor).contiguous(), m.contiguous()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, crop_size={self.crop_size})"


# ---------------------------------------------------------------------------- loading


def _open(path: str | os.PathLike, what: str) -> Image.Image:
    """Open and fully decode ``path``; turn decoder failures into a ``ValueError``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()  # decode now so truncated files fail here, not in a worker later
            return img.copy()  # the file closes on exit; keep decoded pixels and info
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(
            f"cannot read {what} file {path}: {err}. The file is corrupt, truncated or not "
            "an image; re-extract or re-download it, or remove it from the dataset folder."
        ) from err


def _scale_to_uint8(values: np.ndarray, full_range: tuple[float, float]) -> np.ndarray:
    """Linearly map ``full_range`` onto 0..255 (rounded), no information-dropping clip."""
    lo, hi = full_range
    scaled = (values.astype(np.float64) - lo) * (255.0 / max(hi - lo, 1e-12))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer or float single-channel image -> 8-bit ``L``.

    - ``I;16*``: the type's full range, 0..65535 -> 0..255.
    - ``I``: treated as 16-bit (0..65535) when its values fit, else min..max.
    - ``F``: 0..1 -> 0..255 when its values fit, else min..max.
    """
    values = np.asarray(image)
    if image.mode in _UINT16_MODES:
        full_range = (0.0, 65535.0)
    else:
        finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
        lo = float(finite.min()) if finite.size else 0.0
        hi = float(finite.max()) if finite.size else 0.0
        if image.mode == "F" and lo >= 0.0 and hi <= 1.0:
            full_range = (0.0, 1.0)
        elif image.mode == "I" and lo >= 0 and hi <= 65535:
            full_range = (0.0, 65535.0)
        else:
            full_range = (lo, hi)
        values = np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo)
    return Image.fromarray(_scale_to_uint8(values, full_range))


def _composite_on_black(image: Image.Image) -> Image.Image:
    """RGBA -> RGB by compositing on black (colour * alpha / 255)."""
    rgba = np.asarray(image.convert("RGBA"), dtype=np.uint16)  # (H, W, 4)
    rgb = (rgba[..., :3] * rgba[..., 3:4] + 127) // 255
    return Image.fromarray(rgb.astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit ``RGB``.

    Grayscale is replicated to 3 channels; 16-bit/float grayscale is scaled by its
    full range (65535 -> 255), not clipped; images with transparency (RGBA, LA, PA,
    P with a transparent colour) are composited on black, so fully transparent
    pixels become black whatever colour they stored; CMYK/YCbCr/HSV/LAB use PIL's
    conversion.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _UINT16_MODES or mode in ("I", "F"):
        return _high_depth_to_l(image).convert("RGB")
    if mode == "P":
        has_alpha = "transparency" in image.info or image.palette.mode == "RGBA"
        image = image.convert("RGBA" if has_alpha else "RGB")
        return _composite_on_black(image) if has_alpha else image
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        return _composite_on_black(image)
    if mode in ("1", "L"):
        return image.convert("L").convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise ValueError(
            f"cannot convert an image of PIL mode {mode!r} to RGB ({err}); save it as an "
            "8-bit RGB or grayscale PNG."
        ) from err


def to_mask_l(mask: Image.Image) -> Image.Image:
    """Any PIL mask -> 8-bit ``L`` (0..255); colour masks take the max over channels."""
    mode = mask.mode
    if mode == "L":
        return mask
    if mode in _UINT16_MODES or mode in ("I", "F"):
        return _high_depth_to_l(mask)
    if mode == "1":
        return mask.convert("L")
    if mode in ("LA", "La"):
        return mask.getchannel("L")
    # A coloured annotation (e.g. pure red on black) would fall below 127 with the
    # luma formula of convert("L"); the brightest channel keeps it.
    rgb = mask.convert("RGB") if mode != "RGB" else mask
    return Image.fromarray(np.asarray(rgb).max(axis=2).astype(np.uint8))  # (H, W) -> L


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Read any image PIL can decode as 8-bit RGB (see :func:`to_rgb` for the rules).

    Raises ``FileNotFoundError`` if missing and ``ValueError`` if corrupt/not an image.
    """
    return to_rgb(_open(path, "image"))


def load_mask(path: str | os.PathLike) -> Image.Image:
    """Read a ground-truth mask as 8-bit ``L`` (16-bit and colour masks handled)."""
    return to_mask_l(_open(path, "mask"))
