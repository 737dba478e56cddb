"""The Python API: PIL images, numpy arrays and tensors in; scores, maps and masks out."""

import numpy as np
import pytest
import torch
from PIL import Image

from cfa_lightning.geometry import map_to_image
from cfa_lightning.images import to_pil
from cfa_lightning.inference import Predictor
from cfa_lightning.metrics import AnomalyMetrics
from cfa_lightning.models.lit_module import CFALitModule


def test_to_pil_accepts_arrays_tensors_and_modes():
    rng = np.random.default_rng(0)
    cases = [
        rng.integers(0, 255, (20, 30), dtype=np.uint8),  # grayscale
        rng.integers(0, 255, (20, 30, 4), dtype=np.uint8),  # RGBA
        rng.integers(0, 65535, (20, 30), dtype=np.uint16),  # 16-bit
        rng.random((20, 30, 3)).astype(np.float32),  # float in [0, 1]
        torch.rand(3, 20, 30),  # (C, H, W) tensor
        torch.rand(1, 20, 30),
        Image.new("P", (30, 20)),
    ]
    for case in cases:
        image = to_pil(case)
        assert image.mode == "RGB" and image.size == (30, 20)
    with pytest.raises(TypeError, match="cannot score"):
        to_pil(42)
    with pytest.raises(ValueError, match="shape"):
        to_pil(np.zeros((20, 30, 2), dtype=np.uint8))


def test_predictor_returns_maps_at_each_input_resolution(trained_checkpoint):
    predictor = Predictor.from_checkpoint(trained_checkpoint)
    assert predictor.calibrated
    pil = Image.new("RGB", (80, 64), (120, 100, 90))
    images = [pil, np.zeros((33, 47), dtype=np.uint8), torch.rand(3, 100, 50)]
    results = predictor.predict_batch(images)
    assert [r.anomaly_map.shape for r in results] == [(64, 80), (33, 47), (100, 50)]
    for r in results:
        assert r.anomaly_map.dtype == np.float32
        assert 0.0 <= r.normalized_score <= 1.0
        assert r.mask.shape == r.anomaly_map.shape and r.mask.dtype == bool
    single = predictor.predict(images[0])
    assert single.score == pytest.approx(results[0].score, rel=1e-5)


def test_crop_maps_back_to_the_crop_region(trained_checkpoint):
    model = CFALitModule.from_checkpoint(trained_checkpoint).model
    predictor = Predictor(model, image_size=[80, 100], crop_size=[64, 80])
    five = np.full((64, 80), 5.0, dtype=np.float32)
    fmap = map_to_image(five, (160, 200), predictor.resize, predictor.crop)  # resize x2
    inside = fmap[16:144, 20:180]  # crop offsets (8, 10) in resized pixels -> (16, 20)
    assert np.all(inside == 5) and fmap.shape == (160, 200)
    with pytest.raises(ValueError, match="trained at"):
        Predictor(model, image_size=128)


def test_a_score_at_the_threshold_is_anomalous_as_the_metrics_count_it(trained_checkpoint):
    """One rule everywhere: score >= threshold is anomalous, as in AnomalyMetrics' F1 threshold."""
    predictor = Predictor.from_checkpoint(trained_checkpoint)
    images = [torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    first = predictor.predict_batch(images)
    scores = torch.tensor([r.score for r in first])
    labels = (scores >= scores.median()).long()  # the two highest scores are "anomalous"
    metric = AnomalyMetrics(pixel=False)
    metric.update(scores, labels)
    f1_threshold = metric.compute()["image_threshold"]  # the lowest score the metric counts
    assert f1_threshold == pytest.approx(float(scores[labels == 1].min()))
    cal = predictor.model.calibration
    cal.image_threshold.fill_(f1_threshold)
    cal.pixel_threshold.fill_(float(first[0].anomaly_map.max()))  # exactly one map's peak
    again = predictor.predict_batch(images)
    assert [r.is_anomalous for r in again] == [bool(v) for v in labels]
    assert again[0].mask.any()  # the peak pixel itself is in the predicted mask


_PRECISION_FLAGS = (
    "cuda.matmul",
    "cudnn.conv",
    "cudnn.rnn",
    "mkldnn.matmul",
    "mkldnn.conv",
    "mkldnn.rnn",
)


def _backend(name: str):
    obj = torch.backends
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.fixture()
def restore_precision():
    """Puts torch's fp32 precision flags back through the new API (reading the legacy getter
    can raise once the new API has been used)."""
    saved = (torch.backends.fp32_precision, [_backend(n).fp32_precision for n in _PRECISION_FLAGS])
    yield
    torch.backends.fp32_precision = saved[0]
    for name, value in zip(_PRECISION_FLAGS, saved[1], strict=True):
        _backend(name).fp32_precision = value


def _set_legacy(mode):
    torch.set_float32_matmul_precision(mode)


def _set_new(path, value):
    def apply():
        if path == "fp32_precision":
            torch.backends.fp32_precision = value
        else:
            _backend(path).fp32_precision = value

    return apply


PRECISION_MODES = [
    pytest.param(lambda: _set_legacy("high"), id="legacy-high"),
    pytest.param(lambda: _set_legacy("medium"), id="legacy-medium"),
    pytest.param(_set_new("fp32_precision", "tf32"), id="new-all-tf32"),
    pytest.param(_set_new("cuda.matmul", "tf32"), id="new-cuda-matmul-tf32"),
    pytest.param(_set_new("mkldnn.matmul", "bf16"), id="new-mkldnn-matmul-bf16"),
]


@pytest.mark.parametrize("mode", PRECISION_MODES)
def test_predict_and_export_under_every_matmul_precision_mode(
    mode, trained_checkpoint, tmp_path, restore_precision
):
    """The search reads no precision flag, and its distances are direct differences, so the
    Python Predictor and the ONNX export run, and give the fp32 answers, in every mode (after the
    new API, the legacy getter raises: nothing may call it). Skipped where the mode changes no
    float32 matmul; tests/test_distances.py emulates the reduced-precision ranking itself."""
    from cfa_lightning.export import export

    ort = pytest.importorskip("onnxruntime")
    images = [torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    reference = Predictor.from_checkpoint(trained_checkpoint).predict_batch(images)
    probe = torch.rand(64, 256, generator=torch.Generator().manual_seed(0))
    fp32 = probe @ probe.T
    mode()
    if torch.equal(probe @ probe.T, fp32):
        pytest.skip(
            "this precision mode changes no float32 matmul on this CPU (no TF32 or bf16 matmul "
            "here): the Predictor would compare fp32 answers with fp32 answers"
        )
    results = Predictor.from_checkpoint(trained_checkpoint).predict_batch(images)
    for ref, got in zip(reference, results, strict=True):
        assert got.score == pytest.approx(ref.score, rel=1e-5)
        assert np.allclose(got.anomaly_map, ref.anomaly_map, rtol=1e-5, atol=1e-6)
    path = export(trained_checkpoint, "onnx", tmp_path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = torch.stack(images).numpy()
    scores = session.run(None, {"images": batch})[0]
    module = CFALitModule.from_checkpoint(trained_checkpoint)
    with torch.no_grad():
        expected = module.model.eval()(torch.from_numpy(batch)).image_scores.numpy()
    assert np.allclose(scores, expected, rtol=1e-4)
