"""The pieces of the W&B media callback that need no run: sample, colours, histogram, overlay."""

import numpy as np
import torch

from cfa_lightning.callbacks.wandb_media import (
    WandbTestMedia,
    colormap,
    histogram_image,
    sample_indices,
)
from cfa_lightning.models.calibration import Calibration
from cfa_lightning.visualize import HeatScale


def test_the_sample_is_fixed_spread_and_bounded():
    assert sample_indices(14, 3) == [0, 6, 13]
    assert sample_indices(100, 8) == sample_indices(100, 8) and len(sample_indices(100, 8)) == 8
    assert sample_indices(3, 8) == [0, 1, 2]
    assert sample_indices(0, 8) == []


def test_colormap_runs_from_blue_to_red():
    rgb = colormap(np.array([[0.0, 1.0]]))
    assert rgb.shape == (1, 2, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 2] > rgb[0, 0, 0] and rgb[0, 1, 0] > rgb[0, 1, 2]


def test_histogram_image_draws_both_classes_and_the_threshold():
    image = np.asarray(histogram_image(np.array([1.0, 1.1, 5.0, 6.0]), np.array([0, 0, 1, 1]), 3.0))
    assert image.shape == (360, 640, 3)
    blue = (image[..., 2] > 150) & (image[..., 0] < 180)
    red = (image[..., 0] > 150) & (image[..., 2] < 180)
    assert blue.any() and red.any()


def _sample(h=8, w=8):
    mask = np.zeros((h, w), dtype=bool)
    mask[2:4, 2:4] = True
    return {"index": 0, "path": "a/b.png", "defect": "scratch", "score": 2.0, "label": 1,
            "image": np.zeros((h, w, 3), np.uint8), "map": np.arange(h * w, dtype=np.float32).reshape(h, w),
            "mask": mask}  # fmt: skip


def test_overlay_puts_image_and_map_side_by_side_with_toggleable_masks():
    sample = _sample()
    scale = HeatScale.spanning([sample["map"]])
    with_masks = WandbTestMedia(masks=True)._overlay(sample, scale, 30.0)
    assert with_masks.image.size == (16, 8)  # (W, H): image | map
    assert set(with_masks._masks) == {"ground_truth", "prediction"}
    without = WandbTestMedia(masks=False)._overlay(sample, scale, None)
    assert not without._masks


def test_predicted_masks_use_the_models_calibrated_threshold():
    """Not a threshold fitted on the test set: the one stored in the model, with the >= rule."""
    sample = _sample()  # map values 0..63
    cal = Calibration()
    cal.fit(torch.tensor([30.0]), map_low=0.0)  # one validation image: both thresholds 30
    media = WandbTestMedia(masks=True, table=False, histogram=False)._media([], [sample], cal)
    (overlay,) = media["test/overlays"]
    predicted = overlay._masks["prediction"]._val["mask_data"][:, :8]
    assert np.array_equal(predicted, (sample["map"] >= 30).astype(np.uint8))
    assert "colours 0 (blue) to 90 (red)" in overlay._caption  # threshold at a third


def test_a_non_square_overlay_keeps_the_maps_shape():
    """A wide model's map (6 x 10) sits beside its image pixel for pixel, not squashed."""
    sample = _sample(h=6, w=10)  # map values increase along each row, then down
    sample["image"] = np.full((6, 10, 3), 100, np.uint8)
    scale = HeatScale.spanning([sample["map"]])
    media = WandbTestMedia(masks=True)._overlay(sample, scale, 30.0)
    panel = np.asarray(media.image)
    assert panel.shape == (6, 20, 3)  # (H, 2W): image | map
    expected = (0.5 * sample["image"] + 0.5 * colormap(scale(sample["map"]))).astype(np.uint8)
    assert np.array_equal(panel[:, 10:], expected)
    assert media._masks["prediction"]._val["mask_data"].shape == (6, 20)
    assert np.array_equal(media._masks["ground_truth"]._val["mask_data"][:, 10:], sample["mask"])
