"""Tests for data/defects.py: deterministic defects whose masks are exactly the changed pixels."""

from __future__ import annotations

import numpy as np
import pytest

from cfa_lightning.data import defects
from cfa_lightning.data.defects import DEFECT_FAMILIES, check_families, draw_defect


def _images(n: int = 3, shape=(72, 96)) -> list[np.ndarray]:
    rng = np.random.default_rng(123)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    base = 0.5 + 0.2 * np.sin(xx / 5.0)[..., None] * np.array([1.0, 0.8, 0.6])
    return [
        np.clip(base + rng.normal(0, 0.02, (*shape, 3)), 0, 1).astype(np.float32) for _ in range(n)
    ]


@pytest.mark.parametrize("family", DEFECT_FAMILIES)
def test_defect_is_deterministic_and_masks_exactly_the_changed_pixels(family):
    images = _images()
    a, mask_a = draw_defect(family, np.random.default_rng([7, 1]), images[0], images)
    b, mask_b = draw_defect(family, np.random.default_rng([7, 1]), images[0], images)
    assert np.array_equal(a, b) and np.array_equal(mask_a, mask_b)  # same seed, same defect
    assert a.dtype == images[0].dtype and a.shape == images[0].shape
    assert np.array_equal(mask_a, np.any(a != images[0], axis=-1))  # exactly the changed pixels
    assert 4 <= mask_a.sum() < 0.5 * mask_a.size
    assert a.min() >= 0.0 and a.max() <= 1.0
    c, _ = draw_defect(family, np.random.default_rng([8, 1]), images[0], images)
    assert not np.array_equal(a, c)  # another seed, another defect
    assert np.array_equal(images[0], _images()[0])  # the input is left untouched


def test_the_mask_is_the_known_shape_a_painter_drew(monkeypatch):
    # A painter with a shape known in advance: an L of two rectangles, one of them changing the
    # red channel only. The mask must be that L, pixel for pixel, whatever way it is derived.
    image = np.full((40, 50, 3), 0.5, dtype=np.float32)
    expected = np.zeros((40, 50), dtype=bool)
    expected[5:30, 10:16] = True  # the upright bar
    expected[24:30, 16:41] = True  # the foot

    def paint_l(rng, img, sources):
        out = img.copy()
        out[5:30, 10:16] = 0.9  # all three channels
        out[24:30, 16:41, 0] = 0.1  # red only
        return out

    monkeypatch.setitem(defects._FAMILIES, "known_l", paint_l)
    _, mask = draw_defect("known_l", np.random.default_rng(0), image)
    assert mask.dtype == bool and mask.shape == (40, 50)
    assert np.array_equal(mask, expected)


def test_unknown_family_lists_the_known_ones():
    with pytest.raises(
        ValueError, match="unknown defect family 'cutpast'.*cutpaste, cutpaste_scar"
    ):
        check_families(["cutpaste", "cutpast"], "data.synthetic_anomalies.families")
    with pytest.raises(ValueError, match="known families"):
        draw_defect("dent", np.random.default_rng(0), _images(1)[0])


def test_integer_images_are_refused():
    with pytest.raises(TypeError, match="float images"):
        draw_defect("spot", np.random.default_rng(0), np.zeros((40, 40, 3), np.uint8))
