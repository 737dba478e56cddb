"""The colour scale of the heat maps: fixed per model, clipped, threshold marked."""

import numpy as np
import torch

from cfa_lightning.models.calibration import Calibration
from cfa_lightning.visualize import HeatScale, colormap


def _calibration(low: float, threshold: float) -> Calibration:
    cal = Calibration()
    cal.fit(torch.tensor([threshold]), map_low=low)  # quantile of one score: the score itself
    return cal


def test_calibrated_scale_is_fixed_clipped_and_puts_the_threshold_at_a_third():
    scale = HeatScale.from_calibration(_calibration(low=2.0, threshold=5.0))
    assert scale == HeatScale(2.0, 11.0, 5.0)
    assert np.allclose(scale(np.array([0.0, 2.0, 5.0, 11.0, 50.0])), [0, 0, 1 / 3, 1, 1])
    # not renormalised per image: a value has one colour whatever the rest of its map holds
    quiet, loud = np.array([[3.0, 4.0]]), np.array([[3.0, 40.0]])
    assert np.array_equal(colormap(scale(quiet))[0, 0], colormap(scale(loud))[0, 0])
    assert HeatScale.from_calibration(Calibration()) is None  # uncalibrated: no such scale


def test_colour_bar_marks_the_threshold():
    scale = HeatScale(0.0, 9.0, 3.0)
    bar = scale.colour_bar(301)
    assert bar.shape == (28, 301, 3) and bar.dtype == np.uint8
    tick = np.where((bar[:14] < 40).all(axis=-1).all(axis=0))[0]  # an all-black column
    assert tick.size and abs(int(tick.mean()) - 100) <= 2
