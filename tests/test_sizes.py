"""Sizes are parsed in one place, for the data transforms, the model, the configs and export; auto
chooses (H, W) from the training images' shape at a pixel budget."""

import pytest
from omegaconf import OmegaConf

from cfa_lightning.sizes import (
    as_size,
    aspect_rule,
    auto_input_size,
    config_input_size,
    largest_tap_stride,
    model_input_size,
    smallest_budget,
    trained_sizes,
)


def test_ints_pairs_and_list_configs():
    assert as_size(256) == (256, 256)
    assert as_size([256, 320]) == (256, 320)
    assert as_size(OmegaConf.create([64, 80])) == (64, 80)
    assert model_input_size(256, 224) == (224, 224)
    assert model_input_size([256, 320]) == (256, 320)


@pytest.mark.parametrize(("size", "error"), [(True, TypeError), ("256", TypeError),
                                             ([1, 2, 3], TypeError), (0, ValueError)])  # fmt: skip
def test_bad_sizes_name_the_option(size, error):
    with pytest.raises(error, match="data.crop_size"):
        as_size(size, "data.crop_size")


def test_auto_keeps_the_images_shape_at_the_pixel_budget():
    assert auto_input_size(700 / 700, 65536, 16) == (256, 256)  # square: exactly 256 x 256
    assert auto_input_size(900 / 900, 65536, 32) == (256, 256)
    assert auto_input_size(1260 / 500, 65536, 32) == (416, 160)  # long product, H x W
    h, w = auto_input_size(576 / 768, 65536, 16)  # cookies-like 4:3, wide
    assert (h, w) == (224, 288) and h % 16 == 0 and w % 16 == 0
    assert abs(h * w - 65536) / 65536 < 0.05


@pytest.mark.parametrize("median", [(500, 1260), (1260, 500), (300, 300), (64, 400)])
@pytest.mark.parametrize("stride", [8, 16, 32])
def test_auto_sides_are_multiples_of_the_stride_near_the_budget(median, stride):
    h, w = auto_input_size(median[0] / median[1], 65536, stride)
    assert h % stride == 0 and w % stride == 0
    assert (h > w) == (median[0] > median[1]) or median[0] == median[1]
    # rounding each side to the stride moves the area by at most half a stride per side
    aspect = median[1] / median[0]  # W / H
    ideal_h, ideal_w = (65536 / aspect) ** 0.5, (65536 * aspect) ** 0.5
    assert abs(h - ideal_h) <= stride / 2 and abs(w - ideal_w) <= stride / 2


@pytest.mark.parametrize("pixels", [0, -5, 1.5, True])
def test_a_non_positive_budget_names_data_pixels_and_what_works(pixels):
    with pytest.raises(ValueError, match=r"data\.pixels=.*smallest value that works .*=512"):
        auto_input_size(100 / 200, pixels, 16)


def test_a_budget_too_small_for_the_backbone_names_the_smallest_that_works():
    smallest = smallest_budget(500 / 1260, 32)
    assert smallest == 2581  # 32 * 32 * 1260 / 500, rounded up
    with pytest.raises(ValueError, match=f"data.pixels={smallest - 1} is too small.*under 32 px.*"
                                         f"data.pixels={smallest}"):  # fmt: skip
        auto_input_size(500 / 1260, smallest - 1, 32)
    assert min(auto_input_size(500 / 1260, smallest, 32)) == 32  # one tap cell across


def test_the_stride_comes_from_timm_feature_info():
    assert largest_tap_stride("resnet18", [1, 2, 3]) == 16
    assert largest_tap_stride("resnet18", [1, 2, 3, 4]) == 32
    assert largest_tap_stride("tf_efficientnet_lite0", [1, 2, 3]) == 16


def test_auto_has_no_size_until_training_chooses_it():
    assert config_input_size("auto") == "auto"
    assert config_input_size("auto", 224) == [224, 224]  # a crop fixes the model's input
    with pytest.raises(TypeError, match="data.image_size=auto has no size yet"):
        model_input_size("auto")
    data = {"image_size": [48, 128], "crop_size": None}
    assert trained_sizes(data, (48, 128)) == ((48, 128), None)
    assert trained_sizes({"image_size": "auto"}, [48, 128]) == ((48, 128), None)
    assert trained_sizes({}, 64) == ((64, 64), None)


def test_the_aspect_is_measured_per_image_not_from_the_median_sides():
    # five portrait and five landscape 3:4 images: the aspects vary, so the input is square,
    # and one more portrait image does not flip it (the median sides would give 288 x 224)
    for portraits in (5, 6):
        rule = aspect_rule([(400, 300)] * portraits + [(300, 400)] * 5)
        assert rule["rule"] == "square" and rule["aspect"] == 1.0
        assert auto_input_size(rule["aspect"], 65536, 32) == (256, 256)


def test_aspects_that_agree_keep_the_products_shape():
    kolektor = [(630, 250)] * 9 + [(640, 250)] * 9 + [(620, 250)] * 2  # within 2%
    rule = aspect_rule(kolektor)
    assert rule["rule"] == "kept aspect" and rule["spread"] < 1.02
    assert auto_input_size(rule["aspect"], 65536, 16) == (400, 160)
    # a stray tenth of the images does not make a product's aspect vary; a fifth does
    assert aspect_rule([(300, 400)] * 9 + [(400, 300)])["rule"] == "kept aspect"
    assert aspect_rule([(300, 400)] * 8 + [(400, 300)] * 2)["rule"] == "square"
    # magnetic_tile-like: sides from 0.4 to 2.7 apart
    varied = aspect_rule([(200, 500), (300, 300), (540, 200), (250, 400), (400, 260)] * 4)
    assert varied["rule"] == "square" and varied["aspect_range"] == [0.4, 2.7]


def test_the_smallest_side_is_what_taps_blur_and_defects_need():
    from cfa_lightning.sizes import check_input_size, smallest_side

    assert smallest_side(16, 4.0) == 17  # the blur's kernel 33: more than 16 px to reflect
    assert smallest_side(32, 4.0) == 32  # the taps: one stride
    assert smallest_side(8, 0.0) == 16  # the synthetic defects (a spot needs 16 px)
    check_input_size((17, 40), "data.image_size", [17, 40], 17)  # passes
    with pytest.raises(ValueError, match=r"data.crop_size=16 gives a 16x16 .* under the 17 px .*"
                                         r"smallest value that works is data.crop_size=17"):  # fmt: skip
        check_input_size((16, 16), "data.crop_size", 16, 17)


def test_auto_budgets_leave_the_short_side_what_it_needs():
    # 16 x 16 at 256 px failed in the blur; the smallest budget that works is 32 x 32
    with pytest.raises(ValueError, match=r"data.pixels=256 is too small.*data.pixels=1024"):
        auto_input_size(1.0, 256, 16, side=17)
    assert auto_input_size(1.0, 1024, 16, side=17) == (32, 32)
    # 2000 x 50 training images at 16384 px gave a 16 x 816 input; now the budget is refused
    with pytest.raises(ValueError, match=r"data.pixels=16384 is too small.*data.pixels=40960"):
        auto_input_size(2000 / 50, 16384, 16, side=17)
    h, w = auto_input_size(2000 / 50, 40960, 16, side=17)
    assert w == 32 and h % 16 == 0
