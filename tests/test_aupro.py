"""AUPRO against curves and areas worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from cfa_lightning.metrics import AnomalyMetrics, compute_aupro, compute_pro_curve


def two_images() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 4x4 images, one ground-truth region each, worked through by hand below.

    Image 0: region R1 = {(0,0), (0,1)} (2 px) scored 0.9, 0.5;
             normal pixels (3,3) = 0.7 and (2,2) = 0.5 (tied with R1), the rest 0.
    Image 1: region R2 = the 2x2 block at rows/cols 1..2 (4 px) scored 0.8, 0.8, 0.6, 0.0;
             normal pixel (0,0) = 0.6 (tied with R2), the rest 0.
    Normal pixels: 14 + 12 = 26.

    threshold  R1 hit  R2 hit  PRO                    FP  FPR
    0.9        1/2     0/4     (1/2 + 0)/2   = 0.25   0   0
    0.8        1/2     2/4     (1/2 + 1/2)/2 = 0.5    0   0
    0.7        1/2     2/4     0.5                    1   1/26
    0.6        1/2     3/4     (1/2 + 3/4)/2 = 0.625  2   2/26
    0.5        2/2     3/4     (1 + 3/4)/2   = 0.875  3   3/26
    0.0        2/2     4/4     1                      26  1
    """
    maps = torch.zeros(2, 4, 4)
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, 0, 0:2] = True
    maps[0, 0, 0], maps[0, 0, 1] = 0.9, 0.5
    maps[0, 3, 3], maps[0, 2, 2] = 0.7, 0.5
    masks[1, 1:3, 1:3] = True
    maps[1, 1, 1], maps[1, 1, 2], maps[1, 2, 1], maps[1, 2, 2] = 0.8, 0.8, 0.6, 0.0
    maps[1, 0, 0] = 0.6
    return maps, masks


def test_curve_matches_hand_table() -> None:
    fpr, pro = compute_pro_curve(*two_images())
    # (0, 0) first, then one point per distinct score: ties (0.6, 0.5, 0.0) give one point each.
    expected_fpr = torch.tensor([0, 0, 0, 1, 2, 3, 26], dtype=torch.float64) / 26
    expected_pro = torch.tensor([0, 0.25, 0.5, 0.5, 0.625, 0.875, 1.0], dtype=torch.float64)
    torch.testing.assert_close(fpr, expected_fpr)
    torch.testing.assert_close(pro, expected_pro)


def test_aupro_matches_hand_integral() -> None:
    # Trapezoids up to FPR 0.3 = 7.8/26:
    #   [0, 1/26]     heights 0.5, 0.5      -> 0.5    / 26
    #   [1/26, 2/26]  heights 0.5, 0.625    -> 0.5625 / 26
    #   [2/26, 3/26]  heights 0.625, 0.875  -> 0.75   / 26
    #   [3/26, 0.3]   width 4.8/26; PRO at 0.3 interpolated on the segment to (1, 1):
    #                 0.875 + 0.125 * (4.8/26) / (23/26) = 0.875 + 0.6/23 = 0.901087
    # area = 1.8125/26 + (4.8/26) * (0.875 + 0.901087)/2 = 0.0697115 + 0.1639465 = 0.233658
    # AUPRO = area / 0.3 = 0.778860
    area = 1.8125 / 26 + (4.8 / 26) * (0.875 + (0.875 + 0.6 / 23)) / 2
    assert compute_aupro(*two_images()) == pytest.approx(area / 0.3, abs=1e-12)
    assert compute_aupro(*two_images()) == pytest.approx(0.778860, abs=1e-6)


def test_fpr_limit_interpolates_inside_a_segment_and_stops_at_a_vertex() -> None:
    maps, masks = two_images()
    # Limit 1.5/26, halfway along [1/26, 2/26]: PRO there = (0.5 + 0.625)/2 = 0.5625.
    # area = 0.5/26 + (0.5/26) * (0.5 + 0.5625)/2 = 0.765625/26 -> AUPRO = 0.765625/1.5
    assert compute_aupro(maps, masks, fpr_limit=1.5 / 26) == pytest.approx(0.765625 / 1.5)
    # Limit exactly on the vertex 2/26: area = (0.5 + 0.5625)/26 -> AUPRO = 1.0625/2
    assert compute_aupro(maps, masks, fpr_limit=2 / 26) == pytest.approx(1.0625 / 2)
    # Whole curve: 1.8125/26 + (23/26) * (0.875 + 1)/2
    assert compute_aupro(maps, masks, fpr_limit=1.0) == pytest.approx(
        1.8125 / 26 + 23 / 26 * 1.875 / 2
    )


def test_all_tied_scores_give_the_diagonal() -> None:
    maps, masks = two_images()
    fpr, pro = compute_pro_curve(torch.full_like(maps, 0.3), masks)
    # One distinct score: one point after the origin, (1, 1).
    torch.testing.assert_close(fpr, torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(pro, torch.tensor([0.0, 1.0], dtype=torch.float64))
    # Area under PRO = FPR up to 0.3 is 0.3^2/2; divided by 0.3 -> 0.15.
    assert compute_aupro(torch.full_like(maps, 0.3), masks) == pytest.approx(0.15)


def test_perfect_map_scores_one() -> None:
    _, masks = two_images()
    assert compute_aupro(masks.float(), masks) == pytest.approx(1.0)
    # 0/1 integer masks are accepted as well as bool.
    assert compute_aupro(masks.float() * 5, masks.long()) == pytest.approx(1.0)


def test_diagonal_neighbours_form_one_region() -> None:
    # Pixels (0,0), (1,1), (1,2): 8-connected, one region of 3 px; only (0,0) is hit.
    # 8-connectivity: PRO = 1/3; 4-connectivity would give two regions: (1/1 + 0/2)/2 = 0.5.
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = True
    maps = torch.zeros(1, 4, 4)
    maps[0, 0, 0] = 1.0
    fpr, pro = compute_pro_curve(maps, masks)
    assert fpr[1] == 0.0
    assert pro[1] == pytest.approx(1 / 3)


def test_regions_do_not_span_images() -> None:
    # Same place in two images: image 0 region {(0,0)} hit, image 1 region {(0,0), (0,1)} missed.
    # Two regions: PRO = (1 + 0)/2 = 0.5 (merged into one region it would be 1/3).
    masks = torch.zeros(2, 3, 3, dtype=torch.bool)
    masks[0, 0, 0] = masks[1, 0, 0] = masks[1, 0, 1] = True
    maps = torch.zeros(2, 3, 3)
    maps[0, 0, 0] = 1.0
    _, pro = compute_pro_curve(maps, masks)
    assert pro[1] == pytest.approx(0.5)


def test_undefined_cases_give_nan_with_a_warning() -> None:
    maps = torch.rand(2, 4, 4)
    with pytest.warns(UserWarning, match="no anomalous region"):
        assert math.isnan(compute_aupro(maps, torch.zeros(2, 4, 4, dtype=torch.bool)))
    with pytest.warns(UserWarning, match="no normal pixel"):
        assert math.isnan(compute_aupro(maps, torch.ones(2, 4, 4, dtype=torch.bool)))
    with pytest.raises(ValueError, match="no anomalous region"):
        compute_pro_curve(maps, torch.zeros(2, 4, 4, dtype=torch.bool))


def test_bad_inputs_are_rejected() -> None:
    maps, masks = two_images()
    with pytest.raises(ValueError, match="binarise"):
        compute_aupro(maps, masks.long() * 255)
    with pytest.raises(ValueError, match="same shape"):
        compute_aupro(maps[:, :3], masks)
    with pytest.raises(ValueError, match="fpr_limit"):
        compute_aupro(maps, masks, fpr_limit=0.0)


def test_anomaly_metrics_accumulate_aupro_over_batches() -> None:
    maps, masks = two_images()
    labels = masks.flatten(1).any(dim=1).long()
    metric = AnomalyMetrics(pixel=True)
    metric.update(maps[:1].amax(dim=(1, 2)), labels[:1], maps[:1], masks[:1])
    metric.update(maps[1:].amax(dim=(1, 2)), labels[1:], maps[1:].unsqueeze(1),
                  masks[1:].unsqueeze(1))  # (B, 1, H, W) is accepted  # fmt: skip
    assert metric.compute()["pixel_AUPRO"] == pytest.approx(compute_aupro(maps, masks))
    assert all(m.device.type == "cpu" for m in metric.maps)
    metric.reset()
    metric.update(labels.float(), labels, masks.float(), masks)
    assert metric.compute()["pixel_AUPRO"] == pytest.approx(1.0)


def test_matches_a_per_threshold_brute_force() -> None:
    # Random maps with many ties, compared with PRO/FPR evaluated threshold by threshold.
    generator = torch.Generator().manual_seed(0)
    maps = torch.randint(0, 12, (3, 8, 8), generator=generator).float() / 11
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, 1:4, 1:3] = True
    masks[0, 6, 6] = True
    masks[2, 2:7, 3:8] = True
    regions = [masks[0, 1:4, 1:3], masks[0, 6:7, 6:7], masks[2, 2:7, 3:8]]
    region_maps = [maps[0, 1:4, 1:3], maps[0, 6:7, 6:7], maps[2, 2:7, 3:8]]
    fpr, pro = compute_pro_curve(maps, masks)
    thresholds = torch.unique(maps).flip(0)
    assert fpr.numel() == thresholds.numel() + 1
    for i, t in enumerate(thresholds.tolist(), start=1):
        hits = [
            float((m >= t)[r].float().mean()) for m, r in zip(region_maps, regions, strict=True)
        ]
        assert pro[i] == pytest.approx(sum(hits) / len(hits))
        assert fpr[i] == pytest.approx(float((maps[~masks] >= t).float().mean()))
