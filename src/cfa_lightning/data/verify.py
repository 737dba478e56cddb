"""Decode every image and mask once, before training, so no bad file surfaces mid-run."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
from pytorch_lightning.utilities import rank_zero_warn

from ..images import MIN_IMAGE_SIDE, load_mask, load_rgb
from .layout import Sample

__all__ = ["verify_samples"]


class _Problem(NamedTuple):
    path: Path
    reason: str


def _inspect(sample: Sample, min_side: int) -> tuple[_Problem | None, bool]:
    """Decode a sample's image (and mask); return (problem or None, mask has other values)."""
    try:
        image = load_rgb(sample.path)
    except (OSError, ValueError) as err:
        return _Problem(sample.path, f"unreadable ({err.__class__.__name__})"), False
    if min(image.size) < min_side:
        w, h = image.size
        return _Problem(sample.path, f"{w}x{h} px, smaller than {min_side} px"), False
    if sample.mask_path is None:
        return None, False
    try:
        mask = load_mask(sample.mask_path)
    except (OSError, ValueError) as err:
        return _Problem(sample.mask_path, f"unreadable mask ({err.__class__.__name__})"), False
    if mask.size != image.size:
        return _Problem(
            sample.mask_path,
            f"mask is {mask.size[0]}x{mask.size[1]} but its image {sample.path.name} is "
            f"{image.size[0]}x{image.size[1]} (WxH)",
        ), False
    values = np.unique(np.asarray(mask))
    return None, bool(np.isin(values, (0, 255), invert=True).any())


def verify_samples(
    samples: Sequence[Sample],
    *,
    skip_bad: bool = False,
    min_side: int = MIN_IMAGE_SIDE,
    workers: int | None = None,
) -> list[Sample]:
    """Decode every image and mask once, before training, so no bad file surfaces mid-run.

    A file that cannot be decoded, an image with a side below ``min_side`` or a mask whose size
    differs from its image stops the run with the list of files, or with ``skip_bad`` is left
    out with one warning that counts them. Masks with values other than 0/255 are binarised
    at > 127, with one warning.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes without the GIL
        results = list(pool.map(lambda s: _inspect(s, min_side), samples))
    problems = [p for p, _ in results if p is not None]
    soft_masks = [s.mask_path for s, (_, soft) in zip(samples, results, strict=True) if soft]
    if soft_masks:
        rank_zero_warn(
            f"{len(soft_masks)} mask(s) hold values other than 0 and 255 (e.g. {soft_masks[0]}); "
            "they are binarised: a pixel is a defect when its value is > 127."
        )
    if not problems:
        return list(samples)
    listed = "; ".join(f"{p.path} ({p.reason})" for p in problems[:5])
    more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
    if not skip_bad:
        raise ValueError(
            f"{len(problems)} bad image or mask file(s): {listed}{more}. Fix or remove them, "
            "or set data.skip_bad_images=true to leave them out."
        )
    rank_zero_warn(
        f"data.skip_bad_images: skipped {len(problems)} of {len(samples)} image(s): {listed}{more}"
    )
    bad = {p.path for p in problems}
    return [s for s in samples if s.path not in bad and s.mask_path not in bad]
