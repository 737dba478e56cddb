"""ONNX (onnxruntime), OpenVINO IR and TorchScript exports agree with the PyTorch model; INT8
quantises the backbone only by default, calibrated on the training folder."""

import json
import warnings

import numpy as np
import pytest
import torch

from cfa_lightning.deploy import load_runtime
from cfa_lightning.export import ExportableCFA, export, export_model, training_images
from cfa_lightning.models.lit_module import CFALitModule


@pytest.fixture(scope="module")
def reference(trained_checkpoint):
    return ExportableCFA(CFALitModule.from_checkpoint(trained_checkpoint).model).eval()


def _inputs():
    torch.manual_seed(0)
    return [torch.rand(1, 3, 64, 80), torch.rand(3, 3, 64, 80)]  # dynamic batch


def _assert_close(ref, got):
    scores, normalized, maps = ref
    rel = float((maps - got[2]).abs().max() / maps.abs().max())
    assert rel < 1e-4, rel
    assert torch.allclose(scores, got[0], rtol=1e-4)
    assert torch.equal(normalized >= 0.5, got[1] >= 0.5)  # identical decisions


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
    assert {"format_version", "heat_scale", "image_threshold", "pixel_threshold", "normalization",
            "gamma_c", "gamma_d", "package_version", "git_revision"} <= meta.keys()  # fmt: skip


def test_openvino_ir_matches_pytorch(trained_checkpoint, reference, tmp_path):
    pytest.importorskip("openvino")
    path = export(trained_checkpoint, "openvino", tmp_path)
    assert path.name == "model.xml" and (tmp_path / "model.bin").is_file()
    compiled = load_runtime("openvino", path)  # float32 also on CPUs with native bf16
    for x in _inputs():
        with torch.no_grad():
            ref = reference(x)
        got = [torch.from_numpy(out) for out in compiled(x.numpy())]  # scores, normalized, maps
        _assert_close(ref, got)
    assert json.loads((tmp_path / "metadata.json").read_text())["precision"] == "fp32"


def test_int8_quantises_the_backbone_on_training_images(
    trained_checkpoint, synthetic_root, tmp_path
):
    pytest.importorskip("nncf")
    path = export(trained_checkpoint, "openvino", tmp_path, quantize="int8", subset_size=4)
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["precision"] == "int8" and meta["quantize_scope"] == "backbone"
    train = synthetic_root / "synthetic" / "train" / "good"
    assert meta["calibration"] == {"folder": str(train), "images": 9, "used": 4}  # 12 less 3 val
    import re

    quantised = re.findall(r'name="([^"]*)" type="FakeQuantize"', path.read_text())
    assert any(".backbone" in name for name in quantised)
    # the descriptor, the search's matrix product and the blur stay float32
    assert not [n for n in quantised if re.search("descriptor|addmm|blur", n)], quantised


def test_torchscript_matches_pytorch(trained_checkpoint, reference, tmp_path):
    path = export(trained_checkpoint, "torchscript", tmp_path)
    scripted = torch.jit.load(str(path))
    for x in _inputs():
        with torch.no_grad():
            _assert_close(reference(x), scripted(x))


def test_bad_options_are_clear_errors(trained_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="format="):
        export(trained_checkpoint, "tflite", tmp_path)
    with pytest.raises(ValueError, match="needs format=openvino"):
        export(trained_checkpoint, "onnx", tmp_path, quantize="int8")
    with pytest.raises(ValueError, match="calibration_dir=.* holds no image"):
        training_images({}, tmp_path)


def _calibration_and_split(datamodule):
    datamodule.setup("fit")
    images = training_images(dict(datamodule.hparams), None)  # as a checkpoint records them
    held_out = [*datamodule.test_set.samples, *datamodule.val_set.samples]
    return images, [s.path for s in datamodule.train_set.samples], {s.path for s in held_out}


def test_int8_calibrates_on_the_training_split_of_mvtec_data(synthetic_root):
    from cfa_lightning.data import MVTecDataModule

    dm = MVTecDataModule(str(synthetic_root), "synthetic", image_size=(64, 80), val_fraction=0.25)
    images, train, held_out = _calibration_and_split(dm)
    assert images == train and len(images) == 9  # the bank's images: 12 less 3 validation
    assert not set(images) & held_out


def test_int8_calibrates_on_the_training_split_of_a_folder(synthetic_root):
    from cfa_lightning.data import FolderDataModule

    # normal test images held out of the same folder that training reads (test_fraction)
    dm = FolderDataModule(str(synthetic_root / "synthetic"), normal_dir="train/good",
                          abnormal_dirs=["test/spot"], test_fraction=0.25, val_fraction=0.25,
                          image_size=(64, 80))  # fmt: skip
    images, train, held_out = _calibration_and_split(dm)
    assert images == train and len(images) == 7  # 12 less 3 test and 2 validation images
    assert not set(images) & held_out


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_a_bank_larger_than_h_times_w_exports_and_matches_pytorch(
    coreset_checkpoint, tmp_path, fmt
):
    pytest.importorskip("onnxruntime" if fmt == "onnx" else "openvino")
    model = CFALitModule.from_checkpoint(coreset_checkpoint).model
    assert model.bank.construction == "coreset" and model.bank.n_centres > 16 * 20  # h * w
    reference = ExportableCFA(model).eval()
    path = export(coreset_checkpoint, fmt, tmp_path)
    run = load_runtime("onnxruntime" if fmt == "onnx" else "openvino", path)
    for x in _inputs():
        with torch.no_grad():
            ref = reference(x)
        _assert_close(ref, [torch.from_numpy(np.asarray(a)) for a in run(x.numpy())])
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["bank"] == "coreset" and meta["bank_centres"] == model.bank.n_centres


def test_the_trace_warns_of_nothing_and_other_batch_sizes_score_the_same(
    trained_checkpoint, reference, tmp_path
):
    """The model branches on no traced value (no TracerWarning, none filtered): batch sizes
    other than the traced 2 give the eager model's scores."""
    ort = pytest.importorskip("onnxruntime")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scripted = torch.jit.load(str(export(trained_checkpoint, "torchscript", tmp_path / "ts")))
        session = ort.InferenceSession(str(export(trained_checkpoint, "onnx", tmp_path / "onnx")),
                                       providers=["CPUExecutionProvider"])  # fmt: skip
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    torch.manual_seed(1)
    for x in (torch.rand(1, 3, 64, 80), torch.rand(5, 3, 64, 80)):
        with torch.no_grad():
            ref = reference(x)
            _assert_close(ref, scripted(x))
        got = [torch.from_numpy(np.asarray(a)) for a in session.run(None, {"images": x.numpy()})]
        _assert_close(ref, got)


def test_an_unbuilt_bank_stops_before_the_trace(trained_checkpoint, tmp_path):
    """The traced graph leaves out CFA's check of the bank, so the export makes it."""
    model = CFALitModule.from_checkpoint(trained_checkpoint).model
    model.bank.fitted.fill_(False)
    with pytest.raises(ValueError, match="the memory bank is not built"):
        export_model(model, {}, {}, "torchscript", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # stopped before the folder, too


def test_an_unwritable_output_dir_stops_before_the_export(trained_checkpoint, tmp_path,
                                                          monkeypatch):  # fmt: skip
    def exported(*args):
        raise AssertionError("the export ran before the folder was checked")

    monkeypatch.setattr("cfa_lightning.export._onnx", exported)
    (tmp_path / "a_file").write_text("")
    under_a_file = tmp_path / "a_file" / "export"
    with pytest.raises(ValueError) as err:
        export(trained_checkpoint, "onnx", under_a_file)
    assert str(err.value) == (f"output_dir='{under_a_file}' cannot be written (Not a directory); "
                              "give a folder you can write: output_dir=<folder>")  # fmt: skip

    def denied(*args, **kwargs):  # a read-only folder (root writes to any, so it is simulated)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.TemporaryFile", denied)
    with pytest.raises(
        ValueError, match=r"output_dir='.*' cannot be written \(Permission denied\)"
    ):
        export(trained_checkpoint, "onnx", tmp_path / "read_only")
