"""AnomalyMetrics against values worked out by hand (and sklearn when installed)."""

from __future__ import annotations

import warnings

import pytest
import torch

from cfa_lightning.metrics import AnomalyMetrics, compute_aupro

# Four images, labels 0 0 1 1, scores 0.1 0.4 0.35 0.8.
# AUROC: pairs (anomalous, normal) ranked right: 0.35>0.1 yes, 0.35>0.4 no, 0.8>both yes -> 3/4.
# F1 per threshold (anomalous if score >= t):
#   t=0.8:  TP 1 FP 0 FN 1 -> P 1,   R 1/2 -> F1 2/3
#   t=0.4:  TP 1 FP 1 FN 1 -> P 1/2, R 1/2 -> F1 1/2
#   t=0.35: TP 2 FP 1 FN 0 -> P 2/3, R 1   -> F1 0.8   <- best
#   t=0.1:  TP 2 FP 2 FN 0 -> P 1/2, R 1   -> F1 2/3
SCORES = torch.tensor([0.1, 0.4, 0.35, 0.8])
LABELS = torch.tensor([0, 0, 1, 1])


def test_image_metrics_by_hand() -> None:
    metric = AnomalyMetrics(pixel=False)
    metric.update(SCORES, LABELS)
    results = metric.compute()
    assert set(results) == {"image_AUROC", "image_F1", "image_threshold"}
    assert results["image_AUROC"] == pytest.approx(0.75)
    assert results["image_F1"] == pytest.approx(0.8)
    assert results["image_threshold"] == pytest.approx(0.35)


@pytest.mark.parametrize("scale", [100.0, 1e6])
def test_scores_outside_unit_interval_are_not_squashed(scale: float) -> None:
    # torchmetrics would apply a sigmoid to these, turning them all into 1.0 (AUROC 0.5).
    # The second batch alone lies in [0, 1]: the batches must still be treated alike.
    metric = AnomalyMetrics(pixel=False)
    metric.update(SCORES[:2] * scale, LABELS[:2])
    metric.update(torch.tensor([0.35, 0.8]), LABELS[2:])
    metric.update(torch.tensor([0.35, 0.8]) * scale, LABELS[2:])
    results = metric.compute()
    # Scale 100: normals 10 40; anomalous 0.35 0.8 35 80. Pairs ranked right:
    # 0.35 -> 0, 0.8 -> 0, 35 -> 1 (> 10), 80 -> 2; AUROC = 3/8.
    assert results["image_AUROC"] == pytest.approx(3 / 8)
    metric.reset()
    metric.update(SCORES * scale, LABELS)
    results = metric.compute()
    assert results["image_AUROC"] == pytest.approx(0.75)
    assert results["image_threshold"] == pytest.approx(0.35 * scale)


def test_negative_scores() -> None:
    metric = AnomalyMetrics(pixel=False)
    metric.update(SCORES - 5.0, LABELS)
    results = metric.compute()
    assert results["image_AUROC"] == pytest.approx(0.75)
    assert results["image_threshold"] == pytest.approx(0.35 - 5.0)


def test_pixel_metrics_by_hand() -> None:
    # Two 2x2 images. Image 0 normal, image 1 has one anomalous pixel.
    # Pixel scores: normal 0.1 0.2 0.3 0.95 | 0.2 0.1 0.0; anomalous 0.9.
    # Pixel AUROC: 0.9 beats 6 of the 7 normal pixels -> 6/7.
    # F1: t=0.95: TP 0 -> 0; t=0.9: TP 1 FP 1 -> P 1/2 R 1 -> 2/3 (best); lower t only add FPs.
    # PRO curve: (0,0) (1/7, 0) (1/7, 1) ... ; up to FPR 0.3 the area is 0.3 - 1/7 -> AUPRO (0.3 - 1/7)/0.3
    maps = torch.tensor([[[0.1, 0.2], [0.3, 0.95]], [[0.9, 0.2], [0.1, 0.0]]])
    masks = torch.zeros(2, 2, 2, dtype=torch.bool)
    masks[1, 0, 0] = True
    metric = AnomalyMetrics()
    metric.update(torch.tensor([0.95, 0.9]), torch.tensor([0, 1]), maps, masks)
    results = metric.compute()
    assert results["pixel_AUROC"] == pytest.approx(6 / 7)
    assert results["pixel_F1"] == pytest.approx(2 / 3)
    assert results["pixel_threshold"] == pytest.approx(0.9)
    assert results["pixel_AUPRO"] == pytest.approx((0.3 - 1 / 7) / 0.3)
    assert results["pixel_AUPRO"] == pytest.approx(compute_aupro(maps, masks))


def test_only_normal_images_skips_with_one_warning() -> None:
    metric = AnomalyMetrics()
    metric.update(
        torch.tensor([0.2, 0.3]), torch.tensor([0, 0]), torch.rand(2, 4, 4), torch.zeros(2, 4, 4)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = metric.compute()
    assert results == {}
    ours = [w for w in caught if "AnomalyMetrics" in str(w.message)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert "image_AUROC skipped: the test set has only normal images" in message
    assert "no anomalous pixel" in message


def test_only_anomalous_images_keeps_f1() -> None:
    metric = AnomalyMetrics(pixel=False)
    metric.update(torch.tensor([0.2, 0.3]), torch.tensor([1, 1]))
    with pytest.warns(UserWarning, match="only anomalous images"):
        results = metric.compute()
    assert "image_AUROC" not in results
    assert results["image_F1"] == pytest.approx(1.0)
    assert results["image_threshold"] == pytest.approx(0.2)


def test_pixel_update_needs_maps_and_masks() -> None:
    with pytest.raises(ValueError, match="pixel=False"):
        AnomalyMetrics().update(SCORES, LABELS)


def test_reset_and_cpu_states() -> None:
    metric = AnomalyMetrics(pixel=False)
    metric.update(torch.tensor([0.9, 0.1]), torch.tensor([0, 1]))
    assert metric.compute()["image_AUROC"] == pytest.approx(0.0)
    metric.reset()
    metric.update(SCORES, LABELS)
    assert metric.compute()["image_AUROC"] == pytest.approx(0.75)
    assert all(s.device.type == "cpu" for s in metric.image_scores)


def test_agrees_with_sklearn() -> None:
    sk_metrics = pytest.importorskip("sklearn.metrics")
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (200,), generator=generator)
    scores = torch.randint(0, 50, (200,), generator=generator).float() + 3.0 * labels
    masks = torch.rand(200, 16, 16, generator=generator) < 0.1
    maps = torch.rand(200, 16, 16, generator=generator) * 4 + masks * 1.5
    metric = AnomalyMetrics()
    metric.update(scores[:20], labels[:20], maps[:20], masks[:20])
    metric.update(scores[20:], labels[20:], maps[20:], masks[20:])
    results = metric.compute()
    assert results["image_AUROC"] == pytest.approx(sk_metrics.roc_auc_score(labels, scores))
    assert results["pixel_AUROC"] == pytest.approx(
        sk_metrics.roc_auc_score(masks.reshape(-1), maps.reshape(-1))
    )
    precision, recall, _ = sk_metrics.precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / (precision + recall + 1e-300)
    assert results["image_F1"] == pytest.approx(f1.max())
