"""Sizes are parsed in one place, for the data transforms, the model, the configs and export."""

import pytest
from omegaconf import OmegaConf

from cfa_lightning.sizes import as_size, model_input_size


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
