"""Distances to maps (models/maps.py): softmin score, upsample, blur, image score, in float32."""

import math

import pytest
import torch

from cfa_lightning.models.distances import build_index, nearest
from cfa_lightning.models.maps import (
    GaussianBlur,
    anomaly_map,
    gaussian_sigma_kernel,
    patch_scores,
    score_maps,
)


def test_patch_score_by_hand():
    d = torch.tensor([[1.0, 4.0, 9.0]])  # e = 1, 2, 3
    w = math.exp(-1) / (math.exp(-1) + math.exp(-2) + math.exp(-3))
    assert patch_scores(d).item() == pytest.approx(w * 1.0, rel=1e-6)


def test_clamp_before_sqrt_gives_no_nan():
    d = torch.tensor([[-1e-6, 0.0, 0.0]])
    s = patch_scores(d)
    assert torch.isfinite(s).all() and s.item() == 0.0


def test_identical_features_give_no_nan():
    p = torch.full((5, 8), 3.1234567)
    c = torch.full((6, 8), 3.1234567)
    values, _ = nearest(p, build_index(c), 3, 32 * 2**20)
    assert torch.isfinite(patch_scores(values)).all()


def test_anomaly_map_upsamples_blurs_and_keeps_peak():
    assert gaussian_sigma_kernel(4.0) == 33
    scores = torch.zeros(1, 8, 12)
    scores[0, 2, 9] = 1.0
    maps = anomaly_map(scores, (64, 96), GaussianBlur(4.0))
    assert maps.shape == (1, 64, 96)
    peak = divmod(int(maps[0].argmax()), 96)
    assert abs(peak[0] - (2 + 0.5) * 8) <= 2 and abs(peak[1] - (9 + 0.5) * 8) <= 2
    const = anomaly_map(torch.full((2, 4, 4), 0.7), (32, 32), GaussianBlur(4.0))
    assert torch.allclose(const, torch.full_like(const, 0.7), atol=1e-6)  # reflect padding


def test_blur_matches_torchvision_gaussian_blur():
    from torchvision.transforms.v2 import functional as TF

    torch.manual_seed(3)
    maps = torch.rand(2, 1, 40, 56)
    expected = TF.gaussian_blur(maps, kernel_size=[33, 33], sigma=[4.0, 4.0])  # reflect padding
    assert torch.allclose(GaussianBlur(4.0)(maps), expected, atol=1e-6)
    assert torch.equal(GaussianBlur(0.0)(maps), maps)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_maps_are_float32_under_autocast(dtype):
    """A bf16 map of scores around 100-130 has 33 distinct values (123,386 in fp32)."""
    torch.manual_seed(0)
    e = torch.rand(2 * 64 * 64, 3).sort(dim=1).values * 30 + 100  # distances e_1 <= e_2 <= e_3
    nearest_sq = e.square()
    ref = score_maps(nearest_sq, (2, 64, 64), (256, 256), GaussianBlur(4.0))
    with torch.autocast("cpu", dtype=dtype):
        out = score_maps(nearest_sq.to(dtype), (2, 64, 64), (256, 256), GaussianBlur(4.0))
    assert out.maps.dtype == torch.float32 and out.image_scores.dtype == torch.float32
    # the same values up to the rounding of the input distances, not of the map
    n_ref, n_out = ref.maps.unique().numel(), out.maps.unique().numel()
    assert n_ref > 100_000 and n_out > 0.95 * n_ref
    assert torch.allclose(out.image_scores, out.maps.flatten(1).amax(1))
