"""Image sizes as configs give them, parsed in one place: an int for a square, an (H, W) pair, or
``auto`` (the training images' shape at a pixel budget, chosen when training starts); and the
sizes that follow from them: the model's input, the smallest side that works, a checkpoint's
resize and crop. geometry.py moves pixels by these sizes."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence


def as_size(size: int | Sequence[int], option: str = "size") -> tuple[int, int]:
    """``int`` -> square (s, s); a pair -> (H, W). ``option`` names the setting in errors."""
    if isinstance(size, bool):
        raise TypeError(f"{option} must be an int or an (H, W) pair, got {size!r}")
    if is_auto(size):
        raise TypeError(
            f"{option}=auto has no size yet: the training command chooses it from the training "
            "images before it builds the model, and stores it in the checkpoint; outside "
            "training, give an int or an (H, W) pair such as data.image_size=[256, 320]"
        )
    if isinstance(size, int):
        pair = (size, size)
    elif isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2:
        pair = (int(size[0]), int(size[1]))
    else:
        raise TypeError(
            f"{option} must be an int (square) or an (H, W) pair such as [256, 320], got {size!r}"
        )
    if min(pair) <= 0:
        raise ValueError(f"{option} must be positive, got {size!r}")
    return pair


def model_input_size(
    image_size: int | Sequence[int], crop_size: int | Sequence[int] | None = None
) -> tuple[int, int]:
    """The (H, W) the model sees: the crop if one is set, else the resize target."""
    if crop_size is not None:
        return as_size(crop_size, "data.crop_size")
    return as_size(image_size, "data.image_size")


def config_input_size(image_size, crop_size=None) -> list[int] | str:
    """model.input_size as the configs resolve it: ``auto`` stays ``auto`` until training
    measures the images (a crop fixes the size at once)."""
    if is_auto(image_size) and crop_size is None:
        return AUTO
    return list(model_input_size(image_size, crop_size))


# data.image_size=auto: the model's (H, W) keeps the training images' aspect at a pixel budget
# when their aspects agree, and is the square of that budget when they vary.
AUTO = "auto"
MAX_ASPECT = 8.0  # beyond this ratio of the median image's sides, a warning suggests other ways
# The aspects agree when this share of the training images lies within ASPECT_TOLERANCE (a ratio)
# of the median aspect. On the four development products the 90th percentile of that ratio is
# 1.000 (cookies, metal_plate), 1.011 (kolektorsdd) and 2.007 (magnetic_tile, sides 0.39-2.67):
# a 10% stretch keeps a product's shape and still leaves a mixed folder square.
ASPECT_QUANTILE = 0.9
ASPECT_TOLERANCE = 1.1


def is_auto(size) -> bool:
    """Whether a data.image_size value asks for the shape of the training images."""
    return isinstance(size, str) and size == AUTO


def aspect_rule(sizes: Sequence[Sequence[int]]) -> dict:
    """How ``auto`` shapes the input for training images of these (H, W) sizes: each image's
    aspect H / W is measured on its own (never the median sides apart), and the images agree
    when ASPECT_QUANTILE of them lie within ASPECT_TOLERANCE of the median aspect. Returns the
    record the log and metrics.json show: ``aspect`` (H / W of the input: the median, or 1.0)."""
    if not sizes:
        raise ValueError("data.image_size=auto needs at least one training image to measure")
    logs = sorted(math.log(h / w) for h, w in sizes)
    median = statistics.median(logs)
    spread = sorted(abs(a - median) for a in logs)
    at_quantile = math.exp(spread[math.ceil(ASPECT_QUANTILE * len(spread)) - 1])
    agree = at_quantile <= ASPECT_TOLERANCE
    return {
        "rule": "kept aspect" if agree else "square",
        "aspect": math.exp(median) if agree else 1.0,
        "median_aspect": round(math.exp(median), 4),
        "aspect_range": [round(math.exp(logs[0]), 4), round(math.exp(logs[-1]), 4)],
        "spread": round(at_quantile, 4),
        "tolerance": ASPECT_TOLERANCE,
        "quantile": ASPECT_QUANTILE,
        "images": len(sizes),
    }


# The synthetic defects' shortest image side: a spot's semi-axes are 6-10% of the side and it must
# change 4 pixels (data/defects.py); at 12 px the spot family fails, from 16 px every family draws.
DEFECT_MIN_SIDE = 16


def gaussian_sigma_kernel(sigma: float) -> int:
    """Odd kernel size covering +-4 sigma (sigma 4 -> 33, as in docs/method.md, section 5)."""
    return 2 * math.ceil(4 * sigma) + 1


def smallest_side(stride: int, blur_sigma: float = 0.0) -> int:
    """The shortest model input side that works: the taps need one ``stride`` (the largest tap
    stride), the map's reflect-padded blur more pixels than half its kernel, and the synthetic
    validation defects DEFECT_MIN_SIDE (lite0 at blur sigma 4: 17)."""
    half_kernel = gaussian_sigma_kernel(blur_sigma) // 2 if blur_sigma > 0 else 0
    return max(stride, half_kernel + 1, DEFECT_MIN_SIDE)


def check_input_size(size: Sequence[int], option: str, value, side: int) -> None:
    """Stop before any work when the model input ``size`` (H, W), set by ``option``=``value``,
    has a side under ``side`` (`smallest_side`)."""
    if min(size) >= side:
        return
    h, w = size
    fix = f"{option}={side}"
    raise ValueError(
        f"{option}={value} gives a {h}x{w} (H x W) model input, under the {side} px per side that "
        f"the backbone's taps, the anomaly map's blur (model.blur_sigma) and the synthetic "
        f"validation defects need; the smallest value that works is {fix} (or larger)"
    )


def smallest_budget(aspect: float, side: int) -> int:
    """The fewest pixels that give the shorter side of this aspect (H / W) at least ``side``."""
    return math.ceil(side * side * max(aspect, 1.0 / aspect))


def auto_input_size(
    aspect: float, pixels: int, stride: int, side: int | None = None
) -> tuple[int, int]:
    """(H, W) of about ``pixels`` pixels with H / W about ``aspect``, each side a multiple of
    ``stride`` (the largest tap stride: every tap then holds a whole number of patches) and at
    least ``side`` (`smallest_side`; None: one stride)."""
    side = math.ceil((side or stride) / stride) * stride  # the shortest side, whole strides
    smallest = smallest_budget(aspect, side)
    if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels <= 0:
        raise ValueError(
            f"data.pixels={pixels!r} must be a positive number of pixels (H x W of the model "
            f"input); the smallest value that works for these images is data.pixels={smallest}"
        )
    if pixels < smallest:
        raise ValueError(
            f"data.pixels={pixels} is too small: at an aspect of {aspect:.3g} (H / W) the shorter "
            f"side would get under {side} px, what the backbone's taps (largest stride {stride}), "
            "the anomaly map's blur and the synthetic validation defects need; the smallest "
            f"value that works is data.pixels={smallest}"
        )
    ideal_h, ideal_w = math.sqrt(pixels * aspect), math.sqrt(pixels / aspect)
    return (
        max(side, math.floor(ideal_h / stride + 0.5) * stride),
        max(side, math.floor(ideal_w / stride + 0.5) * stride),
    )


def square_side(pixels: int) -> int:
    """The side of a square of about ``pixels`` pixels (auto with a centre crop)."""
    if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels <= 0:
        raise ValueError(f"data.pixels={pixels!r} must be a positive number of pixels")
    return math.floor(math.sqrt(pixels) + 0.5)


def largest_tap_stride(name: str, out_indices: Sequence[int]) -> int:
    """The largest reduction of the backbone's taps, from timm's own ``feature_info``."""
    import timm  # the sizes of a config need no torch; the backbone's strides do

    model = timm.create_model(
        name, pretrained=False, features_only=True, out_indices=tuple(out_indices)
    )
    return int(max(model.feature_info.reduction()))


def trained_sizes(data: Mapping, input_size) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """(resize, crop) a checkpoint's model was trained with, from its datamodule's sizes; where
    those hold no size (``auto`` not yet chosen, a datamodule without them) the model's input."""
    crop = data.get("crop_size")
    crop = as_size(crop, "data.crop_size") if crop else None
    image = data.get("image_size")
    if image is None or is_auto(image):
        return as_size(input_size, "model.input_size"), crop
    return as_size(image, "data.image_size"), crop
