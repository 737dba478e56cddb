"""One geometry between an image and the model: resize, centre crop, and back. Torch-free.

An (H0, W0) image is resized to ``resize`` (H, W), then centre-cropped to ``crop`` (h, w) if one
is set; that is what the model sees. Its (h, w) map goes back onto the part of the image the crop
came from, the rest at the map's lowest value. Training (data/transforms.py), `inference.Predictor`
and `deploy.Inferencer` all take the crop box from here, and the last two the whole path, so an
image gives the same input, map and mask in PyTorch and in an exported model.

sizes.py decides the sizes (the parsing, ``auto``, the smallest side); this module moves pixels
by them: an image into the model's input, a map and a mask back onto the image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

Size = Sequence[int]  # (H, W)


def crop_box(resize: Size, crop: Size) -> tuple[int, int]:
    """(top, left) of a centre crop of ``crop`` out of ``resize``: torchvision's rounding."""
    return int(round((resize[0] - crop[0]) / 2.0)), int(round((resize[1] - crop[1]) / 2.0))


def preprocess(image: Image.Image, resize: Size, crop: Size | None) -> np.ndarray:
    """RGB image -> (3, h, w) float32 in [0, 1], the model's input.

    Scaled to [0, 1] first, then an antialiased bilinear resize per channel on float32 ("F"
    mode): PIL's filter, which torchvision's antialias=True in training reproduces (5e-6 apart);
    clamped, since the filter overshoots at sharp edges; then the centre crop.
    """
    pixels = np.asarray(image, dtype=np.float32) / 255.0  # (H0, W0, 3)
    width_height = (int(resize[1]), int(resize[0]))  # PIL's order
    channels = []
    for c in range(3):
        channel = Image.fromarray(np.ascontiguousarray(pixels[..., c]), "F")
        channels.append(np.asarray(channel.resize(width_height, Image.Resampling.BILINEAR)))
    x = np.clip(np.stack(channels), 0.0, 1.0)  # (3, H, W)
    if crop is not None:
        top, left = crop_box(resize, crop)
        x = x[:, top : top + crop[0], left : left + crop[1]]  # (3, h, w)
    return np.ascontiguousarray(x, dtype=np.float32)


def image_region(size: Size, resize: Size, crop: Size | None) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1): the part of an image of ``size`` (H0, W0) that the model's input shows."""
    h0, w0 = size
    if crop is None:
        return 0, 0, h0, w0
    top, left = crop_box(resize, crop)
    y0, x0 = round(top * h0 / resize[0]), round(left * w0 / resize[1])
    y1, x1 = round((top + crop[0]) * h0 / resize[0]), round((left + crop[1]) * w0 / resize[1])
    return y0, x0, max(y1, y0 + 1), max(x1, x0 + 1)  # at least one pixel of the image


def _linear_weights(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) bilinear interpolation matrix, half-pixel centres, edges clamped: torch's
    F.interpolate(mode="bilinear", align_corners=False) without antialiasing, also when it
    shrinks."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    weights = np.zeros((n_out, n_in))
    np.add.at(weights, (np.arange(n_out), i0), 1.0 - frac)
    np.add.at(weights, (np.arange(n_out), i1), frac)
    return weights


def map_to_image(fmap: np.ndarray, size: Size, resize: Size, crop: Size | None) -> np.ndarray:
    """(h, w) map at model resolution -> (H0, W0) float32, bilinear; outside a centre crop: the
    map's lowest value."""
    y0, x0, y1, x1 = image_region(size, resize, crop)
    fmap = np.asarray(fmap, dtype=np.float64)
    inner = (
        _linear_weights(y1 - y0, fmap.shape[0]) @ fmap @ _linear_weights(x1 - x0, fmap.shape[1]).T
    )
    full = np.full(tuple(size), fmap.min(), dtype=np.float32)
    full[y0:y1, x0:x1] = inner
    return full


def _cover(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) bool: nearest-neighbour resampling, plus each input pixel at the output
    pixel that holds its centre, so that shrinking drops no input pixel."""
    cover = np.zeros((n_out, n_in), dtype=bool)
    nearest = np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(int), n_in - 1)
    cover[np.arange(n_out), nearest] = True
    centre = np.minimum(((np.arange(n_in) + 0.5) * (n_out / n_in)).astype(int), n_out - 1)
    cover[centre, np.arange(n_in)] = True
    return cover


def mask_to_image(mask: np.ndarray, size: Size, resize: Size, crop: Size | None) -> np.ndarray:
    """(h, w) bool mask at model resolution -> (H0, W0) bool: nearest neighbour, and no marked
    pixel lost when the image is smaller than the model's input, so a mask is empty at the
    image's resolution exactly when it is empty at the model's; outside a centre crop: False."""
    y0, x0, y1, x1 = image_region(size, resize, crop)
    mask = np.asarray(mask, dtype=bool)
    rows = _cover(y1 - y0, mask.shape[0]).astype(np.float32)  # counts stay exact in float32
    cols = _cover(x1 - x0, mask.shape[1]).astype(np.float32)
    full = np.zeros(tuple(size), dtype=bool)
    full[y0:y1, x0:x1] = (rows @ mask.astype(np.float32) @ cols.T) > 0
    return full
