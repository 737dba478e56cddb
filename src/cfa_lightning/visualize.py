"""Pictures of anomaly maps: a colour ramp, one fixed colour scale per model, heat-map blends,
predicted-defect contours, a colour bar that marks the threshold, and a caption band."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

THRESHOLD_AT = 1 / 3  # where the calibrated pixel threshold sits on the colour scale


def colormap(values: np.ndarray) -> np.ndarray:
    """A blue-cyan-yellow-red ramp ("jet"-like) for values in [0, 1]: (H, W) -> (H, W, 3) uint8."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.concatenate([r, g, b], axis=-1) * 255).astype(np.uint8)


class HeatScale(NamedTuple):
    """One colour scale for all maps of a model: clipped to [low, high], never renormalised per
    image, so images stay comparable.

    From a calibration: `low` (blue) is the lowest map value of the normal validation images and
    the pixel threshold sits at a third of the scale (marked on the colour bar), so the normal
    range takes the cool colours and the two thirds above the threshold show how far a defect
    rises beyond it; higher values are clipped to red.
    """

    low: float
    high: float
    threshold: float | None = None

    @classmethod
    def from_calibration(cls, calibration) -> HeatScale | None:
        """The scale of a calibrated model (`models.calibration.Calibration`); None if uncalibrated."""
        if not bool(calibration.fitted):
            return None
        low, threshold = float(calibration.low), float(calibration.pixel_threshold)
        return cls(low, low + max(threshold - low, 1e-12) / THRESHOLD_AT, threshold)

    @classmethod
    def spanning(cls, maps: list[np.ndarray]) -> HeatScale:
        """Without a calibration: min to max over a whole set of maps (one scale for the set)."""
        low = min(float(m.min()) for m in maps)
        return cls(low, max(max(float(m.max()) for m in maps), low + 1e-12))

    def __call__(self, fmap: np.ndarray) -> np.ndarray:
        """Map values -> [0, 1], clipped."""
        return np.clip((fmap - self.low) / (self.high - self.low), 0.0, 1.0)

    def colour_bar(self, width: int, height: int = 28) -> np.ndarray:
        """(height, width, 3) uint8: the ramp, its end values, and the threshold as a black tick."""
        ramp = np.broadcast_to(np.linspace(self.low, self.high, width), (height // 2, width))
        bar = Image.new("RGB", (width, height), (255, 255, 255))
        bar.paste(Image.fromarray(colormap(self(ramp))), (0, 0))
        draw = ImageDraw.Draw(bar)
        draw.text((2, height // 2), f"{self.low:.3g}", fill="black")
        draw.text((width - 40, height // 2), f">={self.high:.3g}", fill="black")
        if self.threshold is not None:
            x = round(float(self(np.array(self.threshold))) * (width - 1))
            draw.line([x, 0, x, height // 2], fill="black", width=2)
            draw.text((x + 3, height // 2), f"threshold {self.threshold:.3g}", fill="black")
        return np.asarray(bar)


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


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's own scalable font at ``size`` px (its small bitmap font without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):
        return ImageFont.load_default()


def captioned(
    panel: np.ndarray, parts: list[str], colour: tuple[int, int, int] = (0, 0, 0), min_size: int = 8
) -> np.ndarray:
    """A white band of text above a panel: ``parts`` on one line if they fit, else one per line.

    The text is a 24th of the panel's height (at least 12 px), so it stays legible at any image
    size; on a narrow panel it shrinks to fit, down to ``min_size`` px, and is cut beyond that.
    panel: (H, W, 3) uint8 -> (H + band, W, 3) uint8.
    """
    width = panel.shape[1]
    size = max(12, round(panel.shape[0] / 24))
    margin = max(2, size // 3)
    lines = ["   ".join(parts)]
    if font(size).getlength(lines[0]) > width - 2 * margin:
        lines = list(parts)
        while size > min_size and max(font(size).getlength(t) for t in lines) > width - 2 * margin:
            size -= 1
    step = round(size * 1.25)
    band = Image.new("RGB", (width, step * len(lines) + margin), (255, 255, 255))
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(lines):
        draw.text((margin, margin // 2 + i * step), line, fill=colour, font=font(size))
    return np.concatenate([np.asarray(band), panel], axis=0)
