import pytest
import torch

from cfa_lightning.models.calibration import Calibration


def test_normal_only_validation_uses_a_high_quantile():
    cal = Calibration()
    scores = torch.arange(1.0, 101.0)  # 1..100
    cal.fit(scores, map_low=0.2, quantile=0.99)
    # torch.quantile with linear interpolation: 1 + 0.99 * 99 = 99.01
    assert float(cal.image_threshold) == pytest.approx(99.01)
    assert float(cal.pixel_threshold) == pytest.approx(99.01)  # same level: mask empty <=> normal
    assert float(cal.low) == pytest.approx(0.2) and bool(cal.fitted)


def test_split_with_anomalies_uses_the_f1_thresholds():
    cal = Calibration()
    cal.fit(
        torch.tensor([1.0, 2.0, 9.0]),
        0.0,
        f1_thresholds={"image_threshold": 5.0, "pixel_threshold": 4.0},
    )
    assert (float(cal.image_threshold), float(cal.pixel_threshold)) == (5.0, 4.0)
    cal.fit(torch.tensor([1.0, 2.0, 9.0]), 0.0, f1_thresholds={"image_threshold": 5.0})
    assert float(cal.pixel_threshold) == 5.0  # no masks: the image threshold for pixels too


def test_normalisation_puts_the_threshold_at_one_half():
    cal = Calibration()
    cal.fit(torch.tensor([3.0]), map_low=1.0, quantile=1.0)  # threshold 3, low 1
    got = cal.normalize(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 9.0]), cal.image_threshold)
    assert torch.allclose(got, torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))


def test_bad_calibration_inputs():
    with pytest.raises(ValueError, match="empty validation"):
        Calibration().fit(torch.tensor([]), 0.0)
    with pytest.raises(ValueError, match="threshold_quantile"):
        Calibration().fit(torch.tensor([1.0]), 0.0, quantile=0.0)
