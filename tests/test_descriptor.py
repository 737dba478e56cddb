import torch
import torch.nn.functional as F

from cfa_lightning.models.descriptor import PatchDescriptor


def test_pool_resize_concat_by_hand():
    desc = PatchDescriptor([1, 2], gamma_d=1)
    f1 = torch.arange(16.0).view(1, 1, 4, 4)
    f2 = torch.ones(1, 2, 2, 2)
    z = desc.stack([f1, f2])  # (1, 4, 4, 3 + 2)
    assert z.shape == (1, 4, 4, 5)
    # centre pixel (1, 1): mean of the 3x3 block rows 0-2, cols 0-2 = (0+1+2+4+5+6+8+9+10)/9 = 5
    assert torch.isclose(z[0, 1, 1, 0], torch.tensor(5.0))
    # corner (0, 0) with zero padding counted: (0 + 1 + 4 + 5) / 9 = 10 / 9
    assert torch.isclose(z[0, 0, 0, 0], torch.tensor(10.0 / 9.0))
    # a constant 2x2 tap pooled with zero padding is 4/9 everywhere; a bilinear resize keeps it
    assert torch.allclose(z[0, :, :, 1:3], torch.full((4, 4, 2), 4.0 / 9.0))


def test_coordinates_are_normalised_rows_and_columns():
    desc = PatchDescriptor([1])
    z = desc.stack([torch.zeros(2, 1, 3, 5)])  # (2, 3, 5, 1 + 2)
    assert torch.allclose(z[1, :, 0, 1], torch.tensor([-1.0, 0.0, 1.0]))  # rows
    assert torch.allclose(z[1, 0, :, 2], torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]))  # columns


def test_forward_is_a_1x1_convolution_of_z_with_coordinates():
    torch.manual_seed(0)
    desc = PatchDescriptor([3, 5], gamma_d=2)
    feats = [torch.randn(2, 3, 6, 10), torch.randn(2, 5, 3, 5)]
    z = desc.stack(feats).permute(0, 3, 1, 2)  # (B, D + 2, h, w)
    expected = F.conv2d(z, desc.coord_conv.weight, desc.coord_conv.bias)
    out = desc(feats)
    assert out.shape == (2, 4, 6, 10)  # D' = 8 // 2
    assert torch.allclose(out, expected, atol=1e-5)


def test_non_square_taps_resize_to_first_tap():
    desc = PatchDescriptor([3, 5, 7], gamma_d=2)
    feats = [torch.randn(2, 3, 12, 20), torch.randn(2, 5, 6, 10), torch.randn(2, 7, 3, 5)]
    out = desc(feats)
    assert desc.in_dim == 15 and desc.out_dim == 7
    assert out.shape == (2, 7, 12, 20)


def test_only_the_coordconv_is_trainable():
    desc = PatchDescriptor([4, 4])
    names = [n for n, p in desc.named_parameters() if p.requires_grad]
    assert names == ["coord_conv.weight", "coord_conv.bias"]
    assert desc.coord_conv.in_channels == 8 + 2


def test_tap_norm_scales_each_pooled_tap_to_mean_patch_norm_one():
    torch.manual_seed(0)
    desc = PatchDescriptor([3, 5], tap_norm=True)
    feats = [40.0 * torch.randn(2, 3, 8, 8), 3.0 * torch.randn(2, 5, 4, 4)]
    before = desc.stack(feats)
    scales = desc.fit_tap_scales(feats)
    z = desc.stack(feats)  # (2, 8, 8, 3 + 5 + 2)
    assert torch.allclose(z[..., :3].norm(dim=-1).mean(), torch.tensor(1.0), atol=1e-4)
    # the second tap's norm is taken at its own resolution, before the resize
    pooled = desc.pool(feats[1]) * scales[1]
    assert torch.allclose(pooled.norm(dim=1).mean(), torch.tensor(1.0), atol=1e-4)
    assert torch.equal(z[..., 8:], before[..., 8:])  # coordinates unscaled
    assert "tap_scales" in desc.state_dict()


def test_without_tap_norm_the_state_has_no_scales():
    assert "tap_scales" not in PatchDescriptor([3, 5]).state_dict()
