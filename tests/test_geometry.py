"""One geometry between image and model: the crop box, the map and the mask back at the image's
size, and a mask that is empty at the image's size exactly when it is at the model's."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cfa_lightning.geometry import crop_box, image_region, map_to_image, mask_to_image, preprocess


def test_crop_box_rounds_as_torchvision_also_for_odd_differences():
    from torchvision.transforms.v2 import functional as TF

    for resize, crop in (((256, 256), (225, 225)), ((96, 112), (65, 81)), ((80, 100), (64, 80))):
        marks = torch.arange(resize[0] * resize[1]).view(1, *resize)
        top, left = crop_box(resize, crop)
        expected = TF.center_crop(marks, list(crop))
        assert torch.equal(marks[:, top : top + crop[0], left : left + crop[1]], expected)
    assert crop_box((256, 256), (225, 225)) == (16, 16)  # 15.5 rounds up, not down


def test_the_training_transform_crops_where_predictor_and_deploy_do():
    from cfa_lightning.data.transforms import ImageMaskTransform

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 150, 3), np.uint8))
    x, _ = ImageMaskTransform((96, 112), (65, 81))(image)
    assert np.abs(x.numpy() - preprocess(image, (96, 112), (65, 81))).max() < 1e-5


def test_map_back_is_torch_bilinear_and_the_crop_region():
    fmap = np.random.default_rng(1).random((48, 64)).astype(np.float32)
    for size in ((48, 64), (100, 30), (20, 25)):
        got = map_to_image(fmap, size, (48, 64), None)
        ref = F.interpolate(torch.from_numpy(fmap)[None, None], size=size, mode="bilinear",
                            align_corners=False)[0, 0].numpy()  # fmt: skip
        assert got.shape == size and np.abs(got - ref).max() < 1e-5
    # resize 96 x 112, crop 65 x 81 at (16, 16): an image of twice that size keeps (32, 32) on
    y0, x0, y1, x1 = image_region((192, 224), (96, 112), (65, 81))
    assert (y0, x0, y1, x1) == (32, 32, 162, 194)
    full = map_to_image(np.full((65, 81), 5.0, np.float32), (192, 224), (96, 112), (65, 81))
    assert np.all(full[y0:y1, x0:x1] == 5.0) and full.shape == (192, 224)


@pytest.mark.parametrize("size", [(64, 80), (20, 25), (7, 300), (200, 33), (128, 160)])
@pytest.mark.parametrize("crop", [None, (48, 60)])
def test_a_single_marked_pixel_survives_any_resize(size, crop):
    model = crop or (64, 80)
    for y, x in ((0, 0), (model[0] - 1, model[1] - 1), (model[0] // 2, 17), (5, model[1] // 3)):
        mask = np.zeros(model, dtype=bool)
        mask[y, x] = True
        out = mask_to_image(mask, size, (64, 80), crop)
        assert out.shape == size and out.any(), (y, x)
    assert not mask_to_image(np.zeros(model, dtype=bool), size, (64, 80), crop).any()


def test_a_mask_grows_by_nearest_neighbour():
    mask = np.random.default_rng(2).random((16, 20)) > 0.7
    out = mask_to_image(mask, (64, 60), (16, 20), None)  # x4 rows, x3 columns
    assert np.array_equal(out, np.repeat(np.repeat(mask, 4, axis=0), 3, axis=1))
