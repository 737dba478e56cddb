"""Tests for data/transforms.py: image/mask loading rules and the paired transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cfa_lightning.data.transforms import ImageMaskTransform
from cfa_lightning.images import load_mask, load_rgb


def _save(array_or_image, path, **kwargs):
    image = array_or_image
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image.save(path, **kwargs)
    return path


# ---------------------------------------------------------------------------- transform


def test_non_square_shapes_dtype_and_range():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), np.uint8))
    x, m = ImageMaskTransform(image_size=(40, 56))(image, None)
    assert x.shape == (3, 40, 56) and x.dtype == torch.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert m.shape == (1, 40, 56) and m.dtype == torch.float32
    assert m.sum() == 0  # no mask -> zeros


def test_int_size_is_square_and_no_normalisation():
    image = Image.new("RGB", (30, 20), (255, 0, 51))
    x, _ = ImageMaskTransform(image_size=16)(image, None)
    assert x.shape == (3, 16, 16)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([1.0, 0.0, 0.2]))


def test_mask_binarised_above_127_after_nearest_resize():
    mask = np.zeros((10, 40), np.uint8)
    mask[:, 10:20] = 127
    mask[:, 20:30] = 128
    mask[:, 30:] = 255
    _, m = ImageMaskTransform(image_size=(10, 40))(
        Image.new("RGB", (40, 10)), Image.fromarray(mask)
    )
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert m[0, :, :20].sum() == 0
    assert (m[0, :, 20:] == 1).all()
    # Nearest-neighbour: a 2x downscale keeps a hard edge, no grey values to threshold.
    _, m_small = ImageMaskTransform(image_size=(5, 20))(
        Image.new("RGB", (40, 10)), Image.fromarray(mask)
    )
    assert m_small[0, 0].tolist() == [0] * 10 + [1] * 10


def test_crop_applied_identically_to_image_and_mask():
    image = np.zeros((50, 70, 3), np.uint8)
    mask = np.zeros((50, 70), np.uint8)
    image[12:30, 30:52] = 255
    mask[12:30, 30:52] = 255
    image, mask = Image.fromarray(image), Image.fromarray(mask)

    x_full, m_full = ImageMaskTransform(image_size=(100, 140))(image, mask)
    x, m = ImageMaskTransform(image_size=(100, 140), crop_size=(60, 80))(image, mask)
    assert x.shape == (3, 60, 80) and m.shape == (1, 60, 80)
    # Same geometry as cropping the resized tensors by hand: offsets (20, 30).
    torch.testing.assert_close(x, x_full[:, 20:80, 30:110])
    torch.testing.assert_close(m, m_full[:, 20:80, 30:110])
    # And the square sits at the same place in both.
    bright = x[0] > 0.5
    assert (bright == (m[0] > 0.5)).float().mean() > 0.99


def test_crop_larger_than_resize_is_a_clear_error():
    with pytest.raises(ValueError, match="crop_size"):
        ImageMaskTransform(image_size=224, crop_size=256)
    with pytest.raises(TypeError, match="image_size"):
        ImageMaskTransform(image_size="256")


# ---------------------------------------------------------------------------- load_rgb


def test_grayscale_l_becomes_three_equal_channels(tmp_path):
    path = _save(np.full((9, 7), 77, np.uint8), tmp_path / "l.png")
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (7, 9)
    assert (np.asarray(image) == 77).all()


def test_rgba_and_la_composite_on_black(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[0, :, 3] = 0  # transparent row -> black
    rgba[1, :, 3] = 255  # opaque row -> its colour
    rgba[2:, :, 3] = 128  # half -> half the colour
    out = np.asarray(load_rgb(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png")))
    assert out[0].tolist() == [[0, 0, 0]] * 4
    assert out[1].tolist() == [[200, 100, 50]] * 4
    assert np.abs(out[2].astype(int) - [100, 50, 25]).max() <= 1

    la = Image.new("LA", (3, 3), (180, 0))
    assert (np.asarray(load_rgb(_save(la, tmp_path / "la.png"))) == 0).all()


def test_palette_becomes_rgb(tmp_path):
    image = Image.new("RGB", (6, 5), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert image.mode == "P"
    out = load_rgb(_save(image, tmp_path / "p.png"))
    assert out.mode == "RGB" and (np.asarray(out)[0, 0] == (10, 200, 30)).all()


def test_16bit_scaled_by_full_range_not_clipped(tmp_path):
    values = np.array([[0, 1000, 257 * 100], [32768, 60000, 65535]], np.uint16)
    path = _save(values, tmp_path / "i16.png")
    assert Image.open(path).mode in ("I;16", "I")
    out = np.asarray(load_rgb(path))
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    assert out[..., 0].tolist() == [[0, 4, 100], [128, 233, 255]]  # value * 255 / 65535


def test_32bit_int_and_float_images(tmp_path):
    as_int = Image.fromarray(np.array([[0, 65535]], np.int32))
    assert as_int.mode == "I"
    assert np.asarray(load_rgb(_save(as_int, tmp_path / "i.tif")))[0, :, 0].tolist() == [0, 255]
    as_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert as_float.mode == "F"
    out = np.asarray(load_rgb(_save(as_float, tmp_path / "f.tif")))
    assert out[0, :, 0].tolist() == [0, 128, 255]


def test_cmyk_becomes_rgb(tmp_path):
    path = _save(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), tmp_path / "c.tif")
    assert Image.open(path).mode == "CMYK"
    out = np.asarray(load_rgb(path))
    assert out[0, 0].tolist() == [255, 0, 0]


def test_corrupt_and_non_image_files_raise_value_error_naming_the_file(tmp_path):
    good = _save(np.zeros((64, 64, 3), np.uint8) + 90, tmp_path / "good.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:80])
    with pytest.raises(ValueError, match="truncated.png") as info:
        load_rgb(truncated)
    assert "re-download" in str(info.value)

    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="notes.png"):
        load_rgb(text)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_rgb(tmp_path / "missing.png")


# ---------------------------------------------------------------------------- load_mask


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.fromarray(np.array([[0, 255]], np.uint8)), [0, 255]),
        (Image.fromarray(np.array([[0, 65535]], np.uint16)), [0, 255]),
        (Image.fromarray(np.array([[[0, 0, 0], [255, 0, 0]]], np.uint8)), [0, 255]),  # red on black
        (Image.fromarray(np.array([[False, True]])), [0, 255]),  # mode "1"
    ],
    ids=["L", "I;16", "RGB", "1"],
)
def test_load_mask_returns_l(tmp_path, image, expected):
    mask = load_mask(_save(image, tmp_path / "m.png"))
    assert mask.mode == "L"
    assert np.asarray(mask)[0].tolist() == expected
