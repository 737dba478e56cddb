"""The colour scale of the heat maps: fixed per model, clipped, threshold marked."""

import numpy as np
import torch

from cfa_lightning.models.calibration import Calibration
from cfa_lightning.visualize import HeatScale, captioned, colormap


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


def test_a_non_square_overlay_panel_keeps_the_maps_shape():
    """The test overlays' panel of a wide model: image | heat | contours, each H x W, undistorted."""
    from cfa_lightning.visualize import overlay_panel

    image = np.full((6, 10, 3), 100, np.uint8)
    heat = np.tile(np.linspace(0.0, 1.0, 10, dtype=np.float32), (6, 1))  # cold left, hot right
    truth = np.zeros((6, 10), bool)
    truth[2:4, 7:9] = True
    panel = overlay_panel(image, heat, None, truth)
    assert panel.shape == (6, 30, 3)
    blended = panel[:, 10:20].astype(int)
    assert (blended[:, -1, 0] > blended[:, -1, 2]).all() and (
        blended[:, 0, 2] > blended[:, 0, 0]
    ).all()
    assert (panel[:, 20:][truth] == (0, 220, 0)).all(1).any()  # the contour where the truth is


def test_a_caption_band_sits_above_the_panel_and_stays_legible():
    wide = np.full((240, 900, 3), 90, dtype=np.uint8)
    out = captioned(wide, ["bad/003.png", "score 12.3, normalised 0.71: ANOMALOUS"])
    band = out[: out.shape[0] - 240]
    assert np.array_equal(out[-240:], wide) and band.shape[0] >= 12  # the panel is untouched
    assert (band.min(axis=2) < 128).any() and (band > 250).all(axis=2).mean() > 0.5  # text on white
    one_line = band.shape[0]
    narrow = captioned(wide[:, :150], ["bad/003.png", "score 12.3, normalised 0.71: ANOMALOUS"])
    assert narrow.shape[0] - 240 > one_line  # too wide for one line: a line per part
    big = captioned(np.zeros((4000, 600, 3), dtype=np.uint8), ["a.png"])
    assert big.shape[0] - 4000 >= 4000 / 24  # text grows with the image
