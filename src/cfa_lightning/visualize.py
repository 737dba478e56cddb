"""Pictures of anomaly maps: a colour ramp, heat-map blends and predicted-defect contours."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter


def colormap(values: np.ndarray) -> np.ndarray:
    """A blue-cyan-yellow-red ramp ("jet"-like) for values in [0, 1]: (H, W) -> (H, W, 3) uint8."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.concatenate([r, g, b], axis=-1) * 255).astype(np.uint8)


def contour(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """Boundary pixels of a boolean mask (H, W): the mask minus its erosion."""
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    eroded = np.asarray(img.filter(ImageFilter.MinFilter(2 * width + 1))) > 0
    return mask & ~eroded


def overlay_panel(
    image: np.ndarray,
    heat: np.ndarray,
    mask: np.ndarray | None,
    truth: np.ndarray | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """image | heat map over the image | contours: predicted defect red, ground truth green.

    image: (H, W, 3) uint8; heat: (H, W) in [0, 1]; mask, truth: (H, W) bool or None
    -> (H, 3W, 3) uint8.
    """
    blended = ((1 - alpha) * image + alpha * colormap(heat)).astype(np.uint8)
    outlined = image.copy()
    for region, colour in ((truth, (0, 220, 0)), (mask, (255, 0, 0))):
        if region is not None and region.any():
            outlined[contour(region)] = colour
    return np.concatenate([image, blended, outlined], axis=1)
