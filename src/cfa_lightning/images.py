"""Reading images without torch: any file or array PIL can decode becomes 8-bit RGB, masks 8-bit L.

The one place of these rules: training (data/), `Predictor` and the
torch-free deploy path (deploy.py) all read images here, so an image is the same pixels in each.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    import torch

__all__ = [
    "IMAGE_EXTENSIONS",
    "MIN_IMAGE_SIDE",
    "ImageLike",
    "array_to_pil",
    "image_hw",
    "load_mask",
    "load_rgb",
    "to_mask_l",
    "to_pil",
    "to_rgb",
    "upright",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Smallest image side (pixels) accepted: below it an image carries too little detail to be
# resized to data.image_size meaningfully (a 16 px image would be upscaled 16x to 256).
MIN_IMAGE_SIDE = 32

# What `Predictor` and `Inferencer` score. A tensor is named, not imported: deploy runs without torch.
ImageLike = Union[str, Path, Image.Image, np.ndarray, "torch.Tensor"]

# Modes whose samples are 16-bit unsigned integers (0..65535).
_UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _open(path: str | os.PathLike, what: str) -> Image.Image:
    """Open and fully decode ``path``; turn decoder failures into a ``ValueError``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()  # decode now so truncated files fail here, not in a worker later
            return upright(img.copy())  # the file closes on exit; keep decoded pixels and info
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(
            f"cannot read {what} file {path}: {err}. The file is corrupt, truncated or not "
            "an image; re-extract or re-download it, or remove it from the dataset folder."
        ) from err


# The EXIF orientation tag: 1 is upright; 5 to 8 turn the stored image by 90 degrees.
_ORIENTATION = 0x0112


def upright(image: Image.Image) -> Image.Image:
    """The image as a viewer shows it: its EXIF orientation applied (a phone's portrait JPEG is
    stored sideways with a tag). Training, predict and deploy all read images through here."""
    if image.getexif().get(_ORIENTATION, 1) == 1:
        return image
    return ImageOps.exif_transpose(image)


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
    conversion. The EXIF orientation is applied first (`upright`), also to images given in memory.
    """
    image = upright(image)
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


def array_to_pil(a: np.ndarray) -> Image.Image:
    """(H, W), (H, W, 1|3|4) array -> 8-bit RGB PIL image: uint8 as is, uint16 by its full range,
    floats taken as [0, 1]."""
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.dtype.kind == "f":
        a = (np.clip(a, 0.0, 1.0) * 255).round().astype(np.uint8)
    elif a.dtype == np.uint16:
        return to_rgb(Image.fromarray(a if a.ndim == 2 else (a // 257).astype(np.uint8)))
    elif a.dtype != np.uint8:
        raise TypeError(f"unsupported array dtype {a.dtype}; use uint8, uint16 or float in [0, 1]")
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ValueError(f"expected an (H, W), (H, W, 3) or (H, W, 4) image, got shape {a.shape}")
    return to_rgb(Image.fromarray(np.ascontiguousarray(a)))


def to_pil(image: ImageLike) -> Image.Image:
    """Any image a user scores -> 8-bit RGB PIL image: a path (`load_rgb`), a PIL image
    (`to_rgb`), a numpy array (`array_to_pil`) or a (C, H, W) or (H, W, C) torch tensor."""
    if isinstance(image, str | Path):
        return load_rgb(image)
    if isinstance(image, Image.Image):
        return to_rgb(image)
    torch = sys.modules.get("torch")  # a tensor exists only where torch is already imported
    if torch is not None and isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3, 4):  # (C, H, W) -> (H, W, C)
            t = t.permute(1, 2, 0)
        image = t.numpy()
    if isinstance(image, np.ndarray):
        return array_to_pil(image)
    raise TypeError(f"cannot score an object of type {type(image).__name__}")


def image_hw(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) of an image file as it is shown (after its EXIF orientation), read from its header
    without decoding the pixels."""
    try:
        with Image.open(path) as img:
            turned = img.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8)
            return (img.width, img.height) if turned else (img.height, img.width)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(
            f"cannot read image file {path}: {err}. The file is corrupt, truncated or not an "
            "image; re-extract or re-download it, or remove it from the dataset folder."
        ) from err
