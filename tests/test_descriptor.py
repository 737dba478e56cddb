import torch

from cfa_lightning.models.descriptor import CoordConv1x1, PatchDescriptor


def test_pool_resize_concat_by_hand():
    desc = PatchDescriptor([1, 2], gamma_d=1)
    f1 = torch.arange(16.0).view(1, 1, 4, 4)
    f2 = torch.ones(1, 2, 2, 2)
    z = desc.pool_and_stack([f1, f2])  # (1, 3, 4, 4)
    assert z.shape == (1, 3, 4, 4)
    # centre pixel (1, 1): mean of the 3x3 block rows 0-2, cols 0-2 = (0+1+2+4+5+6+8+9+10)/9 = 5
    assert torch.isclose(z[0, 0, 1, 1], torch.tensor(5.0))
    # corner (0, 0) with zero padding counted (count_include_pad): (0+1+4+5)/9 = 10/9
    assert torch.isclose(z[0, 0, 0, 0], torch.tensor(10.0 / 9.0))
    # a constant tap pooled with zero padding is 4/9 at the corner of a 2x2 map, 4/9 everywhere;
    # resizing a constant map bilinearly keeps it constant
    assert torch.allclose(z[0, 1:], torch.full((2, 4, 4), 4.0 / 9.0))


def test_non_square_taps_resize_to_first_tap():
    desc = PatchDescriptor([3, 5, 7], gamma_d=2)
    feats = [torch.randn(2, 3, 12, 20), torch.randn(2, 5, 6, 10), torch.randn(2, 7, 3, 5)]
    out = desc(feats)
    assert desc.in_dim == 15 and desc.out_dim == 7
    assert out.shape == (2, 7, 12, 20)


def test_coordconv_coordinates_and_only_trainable_weights():
    cc = CoordConv1x1(1, 3)
    with torch.no_grad():
        cc.conv.weight.zero_()
        cc.conv.bias.zero_()
        cc.conv.weight[0, 1] = 1.0  # output 0 = row coordinate
        cc.conv.weight[1, 2] = 1.0  # output 1 = column coordinate
    out = cc(torch.zeros(1, 1, 3, 5))
    assert torch.allclose(out[0, 0, :, 0], torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.allclose(out[0, 1, 0], torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]))
    desc = PatchDescriptor([4, 4])
    names = [n for n, p in desc.named_parameters() if p.requires_grad]
    assert names == ["coord_conv.conv.weight", "coord_conv.conv.bias"]
    assert desc.coord_conv.conv.in_channels == 8 + 2
