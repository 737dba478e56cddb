"""Synthetic defects with exact masks: the one place where defects are drawn.

Both the generated demo data set (``synthetic.py``) and the synthetic-anomaly validation split
(``val_anomalies.py``) draw their defects here. Images are float arrays (H, W, 3) in [0, 1];
:func:`draw_defect` returns a new image and the boolean mask of exactly the pixels that changed.
Everything is deterministic for a ``numpy.random.Generator`` state.

Families (ideas from the literature, written for this project):

- ``cutpaste``: a rectangle of the same or another normal image, colour-jittered, pasted
  elsewhere (Li et al., CutPaste, CVPR 2021);
- ``cutpaste_scar``: the same with a long, thin, rotated strip;
- ``perlin``: an irregular region from thresholded fractal noise, filled with a foreign texture,
  another normal image or a colour / brightness shift, blended in (as DRAEM does, Zavrtanik et
  al., ICCV 2021);
- ``scratch``: one or two thin bright or dark polylines;
- ``crack``: a long, jagged line one or two pixels wide that darkens what lies under it, often
  with a branch: a faint defect, where the others are loud;
- ``spot``: a small filled ellipse of a foreign colour.

Choosing detectors on such anomalies follows SWSA (Fung et al., arXiv 2310.10461).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["DEFECT_FAMILIES", "check_families", "draw_defect", "fractal_noise"]

Sources = Sequence[np.ndarray]  # other normal images (H, W, 3), for pasted content
_FOREIGN_COLOURS = (np.array([0.15, 0.30, 0.80]), np.array([0.80, 0.15, 0.10]))


def _side(image: np.ndarray) -> int:
    return min(image.shape[:2])


def _jitter(rng: np.random.Generator, patch: np.ndarray) -> np.ndarray:
    """Brightness, contrast and per-channel colour jitter of pasted content, clipped to [0, 1]."""
    gain = rng.uniform(0.8, 1.2) * rng.uniform(0.9, 1.1, size=3)  # contrast x colour
    offset = rng.uniform(-0.1, 0.1)  # brightness
    mean = patch.mean(axis=tuple(range(patch.ndim - 1)), keepdims=True)
    return np.clip((patch - mean) * gain + mean + offset, 0.0, 1.0)


def _pick_source(rng: np.random.Generator, image: np.ndarray, sources: Sources) -> np.ndarray:
    """The image itself or, half of the time, another normal image of the same size."""
    others = [s for s in sources if s.shape == image.shape and s is not image]
    if others and rng.random() < 0.5:
        return others[int(rng.integers(len(others)))]
    return image


def _paste_region(
    rng: np.random.Generator, image: np.ndarray, region: np.ndarray, sources: Sources
) -> np.ndarray:
    """Fill ``region`` (H, W) bool with jittered content taken from elsewhere (a shifted copy)."""
    h, w = region.shape
    ys, xs = np.nonzero(region)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    source = _pick_source(rng, image, sources)
    # A shift that keeps the source region inside the image and moves it by at least its size
    # (same image) or anywhere (another image).
    for _ in range(20):
        dy = int(rng.integers(-y0, h - y1))
        dx = int(rng.integers(-x0, w - x1))
        if source is not image or abs(dy) > (y1 - y0) // 2 or abs(dx) > (x1 - x0) // 2:
            break
    out = image.copy()
    out[ys, xs] = _jitter(rng, source[ys + dy, xs + dx])
    return out


def _rotated_rect(
    shape: tuple[int, int], centre: tuple[float, float], length: float, width: float, angle: float
) -> np.ndarray:
    """Boolean (H, W) mask of a rectangle rotated by ``angle`` (radians) about ``centre``."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dy, dx = yy - centre[0], xx - centre[1]
    u = dx * math.cos(angle) + dy * math.sin(angle)  # along the long side
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    return (np.abs(u) <= length / 2) & (np.abs(v) <= width / 2)


def _cutpaste(rng: np.random.Generator, image: np.ndarray, sources: Sources) -> np.ndarray:
    h, w = image.shape[:2]
    area = rng.uniform(0.02, 0.10) * h * w
    aspect = math.exp(rng.uniform(math.log(0.3), math.log(3.3)))
    ph = int(np.clip(round(math.sqrt(area * aspect)), 2, h - 2))
    pw = int(np.clip(round(math.sqrt(area / aspect)), 2, w - 2))
    y, x = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    region = np.zeros((h, w), dtype=bool)
    region[y : y + ph, x : x + pw] = True
    return _paste_region(rng, image, region, sources)


def _cutpaste_scar(rng: np.random.Generator, image: np.ndarray, sources: Sources) -> np.ndarray:
    h, w = image.shape[:2]
    side = _side(image)
    length = rng.uniform(0.10, 0.25) * side
    width = max(2.0, rng.uniform(0.01, 0.04) * side)
    margin = length / 2 + width
    centre = (rng.uniform(margin, h - margin), rng.uniform(margin, w - margin))
    region = _rotated_rect((h, w), centre, length, width, rng.uniform(0.0, math.pi))
    return _paste_region(rng, image, region, sources)


def fractal_noise(rng: np.random.Generator, shape: tuple[int, int], octaves: int = 4) -> np.ndarray:
    """Smooth random field (H, W): a sum of bilinearly upsampled random grids, halving per octave."""
    h, w = shape
    base = int(rng.integers(2, 5))  # cells along the short side at the coarsest octave
    field = np.zeros((h, w), dtype=np.float64)
    for octave in range(octaves):
        cells = base * 2**octave
        gh, gw = max(2, round(cells * h / min(h, w))), max(2, round(cells * w / min(h, w)))
        grid = rng.standard_normal((gh, gw)).astype(np.float32)
        up = Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BILINEAR)
        field += np.asarray(up, dtype=np.float64) * 0.5**octave
    return field


def _foreign_texture(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A texture foreign to any product: coloured fractal noise or random stripes. (H, W, 3)."""
    h, w = shape
    colour_a, colour_b = rng.uniform(0.0, 1.0, size=(2, 3))
    if rng.random() < 0.5:
        t = fractal_noise(rng, shape, octaves=5)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-12)
    else:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        angle, period = rng.uniform(0, math.pi), rng.uniform(0.02, 0.08) * min(h, w)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period)
    return colour_a + t[..., None] * (colour_b - colour_a)


def _perlin(rng: np.random.Generator, image: np.ndarray, sources: Sources) -> np.ndarray:
    h, w = image.shape[:2]
    field = fractal_noise(rng, (h, w))
    coverage = rng.uniform(0.01, 0.08)  # fraction of the image inside the region
    region = field > np.quantile(field, 1.0 - coverage)
    fill_kind = int(rng.integers(3))
    if fill_kind == 0:  # foreign texture
        fill = _foreign_texture(rng, (h, w))
    elif fill_kind == 1:  # another normal image (or this one), shifted
        source = _pick_source(rng, image, sources)
        fill = _jitter(rng, np.roll(source, (h // 3, w // 3), axis=(0, 1)))
    else:  # colour / brightness shift of the image itself
        shift = rng.uniform(0.15, 0.35) * rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.0, size=3)
        fill = np.clip(image + shift, 0.0, 1.0)
    beta = rng.uniform(0.6, 1.0)  # opacity of the fill
    out = image.copy()
    out[region] = (1.0 - beta) * image[region] + beta * fill[region]
    return out


def _scratch(rng: np.random.Generator, image: np.ndarray, sources: Sources) -> np.ndarray:
    """One or two thin, slightly bent, bright or dark polylines."""
    h, w = image.shape[:2]
    side = _side(image)
    width = max(2, round(side / 40))
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 3))):
        length = rng.uniform(0.30, 0.50) * side
        angle = rng.uniform(0.0, 2.0 * math.pi)
        margin = length / 2 + width
        cx, cy = rng.uniform(margin, w - margin), rng.uniform(margin, h - margin)
        step = length / 3
        x, y = cx - math.cos(angle) * length / 2, cy - math.sin(angle) * length / 2
        points = [(x, y)]
        for _ in range(3):  # three segments, slightly bent
            angle += rng.uniform(-0.35, 0.35)
            x, y = x + math.cos(angle) * step, y + math.sin(angle) * step
            points.append((x, y))
        draw.line(points, fill=255, width=width, joint="curve")
    region = np.asarray(canvas) > 0  # (H, W)
    value = 0.97 if rng.random() < 0.5 else 0.06
    out = image.copy()
    out[region] = np.clip(value + rng.normal(0.0, 0.015, size=(int(region.sum()), 3)), 0, 1)
    return out


def _crack(rng: np.random.Generator, image: np.ndarray, sources: Sources) -> np.ndarray:
    """A jagged dark line, 1-2 px wide, that multiplies the image by 0.4-0.75 (low contrast)."""
    h, w = image.shape[:2]
    width = int(rng.integers(1, 3))
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    length = rng.uniform(0.15, 0.40) * max(h, w)
    n_steps = int(rng.integers(8, 17))
    step = length / n_steps
    angle = rng.uniform(0.0, 2.0 * math.pi)
    x, y = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
    points = [(x, y)]
    for _ in range(n_steps):  # a random walk that keeps its direction roughly
        angle += rng.uniform(-0.6, 0.6)
        x = float(np.clip(x + math.cos(angle) * step, 0, w - 1))
        y = float(np.clip(y + math.sin(angle) * step, 0, h - 1))
        points.append((x, y))
    draw.line(points, fill=255, width=width)
    if rng.random() < 0.5:  # a branch from a point of the line
        bx, by = points[int(rng.integers(1, len(points) - 1))]
        branch_angle = angle + rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.2)
        tail = [(bx, by)]
        for _ in range(int(rng.integers(2, 6))):
            branch_angle += rng.uniform(-0.6, 0.6)
            bx = float(np.clip(bx + math.cos(branch_angle) * step, 0, w - 1))
            by = float(np.clip(by + math.sin(branch_angle) * step, 0, h - 1))
            tail.append((bx, by))
        draw.line(tail, fill=255, width=1)
    region = np.asarray(canvas) > 0  # (H, W)
    out = image.copy()
    out[region] = image[region] * rng.uniform(0.40, 0.75)
    return out


def _spot(rng: np.random.Generator, image: np.ndarray, sources: Sources) -> np.ndarray:
    """A filled, rotated ellipse of a foreign (blue or red) colour."""
    h, w = image.shape[:2]
    side = _side(image)
    a, b = rng.uniform(0.06, 0.10, size=2) * side  # semi-axes in pixels
    margin = max(a, b) + 2
    cx, cy = rng.uniform(margin, w - margin), rng.uniform(margin, h - margin)
    rot = rng.uniform(0.0, math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dx, dy = xx - cx, yy - cy
    u = dx * math.cos(rot) + dy * math.sin(rot)
    v = -dx * math.sin(rot) + dy * math.cos(rot)
    region = (u / a) ** 2 + (v / b) ** 2 <= 1.0  # (H, W)
    colour = _FOREIGN_COLOURS[int(rng.integers(len(_FOREIGN_COLOURS)))]
    out = image.copy()
    out[region] = np.clip(colour + rng.normal(0.0, 0.02, size=(int(region.sum()), 3)), 0, 1)
    return out


_FAMILIES: dict[str, Callable[[np.random.Generator, np.ndarray, Sources], np.ndarray]] = {
    "cutpaste": _cutpaste,
    "cutpaste_scar": _cutpaste_scar,
    "perlin": _perlin,
    "scratch": _scratch,
    "spot": _spot,
    "crack": _crack,
}
DEFECT_FAMILIES: tuple[str, ...] = tuple(_FAMILIES)


def check_families(families: str | Sequence[str], option: str = "families") -> list[str]:
    """Validated list of family names; an unknown name is an error that lists the known ones."""
    names = [families] if isinstance(families, str) else [str(f) for f in families]
    if not names:
        raise ValueError(f"{option} is empty; choose from: {', '.join(DEFECT_FAMILIES)}")
    unknown = [n for n in names if n not in _FAMILIES]
    if unknown:
        raise ValueError(
            f"{option}: unknown defect family {', '.join(map(repr, unknown))}; "
            f"known families: {', '.join(DEFECT_FAMILIES)}"
        )
    return names


def draw_defect(
    family: str,
    rng: np.random.Generator,
    image: np.ndarray,
    sources: Sources = (),
    min_pixels: int = 4,
    max_tries: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect of ``family`` on a copy of ``image`` (H, W, 3) float in [0, 1].

    Returns ``(defective image, mask)``: the mask (H, W) bool is True exactly where a pixel
    changed. A draw that changes fewer than ``min_pixels`` pixels (content pasted onto identical
    content) is redrawn from the same generator, so the result stays deterministic.
    """
    (name,) = check_families([family])
    painter = _FAMILIES[name]
    image = np.asarray(image)
    if not np.issubdtype(image.dtype, np.floating):
        raise TypeError(f"draw_defect takes float images in [0, 1], got {image.dtype}")
    for _ in range(max_tries):
        out = painter(rng, image, sources)
        mask = np.any(out != image, axis=-1)  # (H, W): exactly the changed pixels
        if int(mask.sum()) >= min_pixels:
            return out, mask
    raise RuntimeError(f"defect family {name!r} changed no pixels in {max_tries} tries")
