"""ONNX (run with onnxruntime) and TorchScript exports agree with the PyTorch model."""

import json

import numpy as np
import pytest
import torch

from cfa_lightning.export import ExportableCFA, export
from cfa_lightning.models.lit_module import CFALitModule


@pytest.fixture(scope="module")
def reference(trained_checkpoint):
    model = CFALitModule.from_checkpoint(trained_checkpoint).model
    return ExportableCFA(model, image_size=[64, 80]).eval()


def _inputs():
    torch.manual_seed(0)
    return [torch.rand(1, 3, 64, 80), torch.rand(3, 3, 90, 120)]  # dynamic batch and size


def _assert_close(ref, got):
    scores, normalized, maps = ref
    rel = float((maps - got[2]).abs().max() / maps.abs().max())
    assert rel < 1e-4, rel
    assert torch.allclose(scores, got[0], rtol=1e-4)
    cal_thr = 0.5
    assert torch.equal(normalized > cal_thr, got[1] > cal_thr)  # identical decisions


def test_onnx_matches_pytorch(trained_checkpoint, reference, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = export(trained_checkpoint, "onnx", tmp_path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for x in _inputs():
        with torch.no_grad():
            ref = reference(x)
        got = [torch.from_numpy(np.asarray(a)) for a in session.run(None, {"images": x.numpy()})]
        assert got[2].shape == (x.shape[0], 64, 80)
        _assert_close(ref, got)
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["input_size"] == [64, 80] and meta["backbone"] == "resnet18"
    assert meta["calibrated"] is True and meta["taps"] == [1, 2, 3]
    assert {"image_threshold", "pixel_threshold", "normalization", "gamma_c", "gamma_d",
            "package_version", "git_revision"} <= meta.keys()  # fmt: skip


def test_torchscript_matches_pytorch(trained_checkpoint, reference, tmp_path):
    path = export(trained_checkpoint, "torchscript", tmp_path)
    scripted = torch.jit.load(str(path))
    for x in _inputs():
        with torch.no_grad():
            _assert_close(reference(x), scripted(x))


def test_unknown_format_is_a_clear_error(trained_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="format="):
        export(trained_checkpoint, "tflite", tmp_path)
