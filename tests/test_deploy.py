"""The torch-free deploy path: exports scored by onnxruntime / OpenVINO agree with `Predictor`,
bad folders and runtimes stop with one line, and no module on the path imports torch."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cfa_lightning.deploy import FORMAT_VERSION, DeployError, Inferencer, preprocess
from cfa_lightning.export import export

ROOT = Path(__file__).resolve().parents[1]
RUNTIMES = [("onnx", "onnxruntime"), ("onnx", "openvino"), ("openvino", "openvino")]
# Loaded at interpreter start: any import of torch (or what needs it) on the path raises.
NO_TORCH_HOOK = textwrap.dedent("""
    import sys

    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "pytorch_lightning", "lightning"):
                raise ImportError(f"the torch-free deploy path imported {name}")
            return None

    sys.meta_path.insert(0, _NoTorch())
""")


@pytest.fixture(scope="module")
def exports(trained_checkpoint, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("exports")
    folders = {"onnx": out / "onnx"}
    export(trained_checkpoint, "onnx", folders["onnx"])
    if _has("openvino"):
        folders["openvino"] = out / "openvino"
        export(trained_checkpoint, "openvino", folders["openvino"])
    return folders


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _images() -> list:
    """Sizes other than the model's 64 x 80 (larger and smaller: the host resize), mixed kinds."""
    rng = np.random.default_rng(0)
    return [
        rng.integers(0, 255, (90, 120, 3), dtype=np.uint8),
        Image.fromarray(rng.integers(0, 255, (50, 40), dtype=np.uint8)),  # grayscale
        rng.random((70, 70, 3)).astype(np.float32),
        rng.integers(0, 255, (64, 80, 3), dtype=np.uint8),
    ]


def test_preprocess_matches_the_training_transform():
    from cfa_lightning.data.transforms import ImageMaskTransform

    rng = np.random.default_rng(1)
    for shape, crop in (((200, 170), None), ((40, 50), None), ((65, 79), (48, 60))):
        image = Image.fromarray(rng.integers(0, 255, (*shape, 3), dtype=np.uint8))
        ref = ImageMaskTransform((64, 80), crop)(image)[0].numpy()
        got = preprocess(image, (64, 80), crop)
        assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-5


@pytest.mark.parametrize(("fmt", "runtime"), RUNTIMES)
def test_runtimes_match_pytorch(trained_checkpoint, exports, fmt, runtime):
    if runtime == "openvino" and not _has("openvino"):
        pytest.skip("openvino is not installed (pip install 'cfa-lightning[openvino]')")
    from cfa_lightning.inference import Predictor

    ref = Predictor.from_checkpoint(trained_checkpoint).predict_batch(_images())
    inferencer = Inferencer(exports[fmt], runtime)
    got = inferencer.predict_batch(_images())
    assert inferencer.calibrated
    for r, g in zip(ref, got, strict=True):
        assert g.anomaly_map.shape == r.anomaly_map.shape and g.anomaly_map.dtype == np.float32
        rel = np.abs(g.anomaly_map - r.anomaly_map).max() / np.abs(r.anomaly_map).max()
        assert rel < 1e-4, rel
        assert g.score == pytest.approx(r.score, rel=1e-4)
        assert g.normalized_score == pytest.approx(r.normalized_score, rel=1e-4, abs=1e-6)
        assert g.is_anomalous == r.is_anomalous  # identical decisions
        assert np.mean(g.mask != r.mask) < 1e-3  # pixels within 1e-7 of the threshold may flip


def test_the_decision_rule_is_score_at_least_threshold(exports, tmp_path):
    folder = tmp_path / "at"
    shutil.copytree(exports["onnx"], folder)
    image = _images()[0]
    first = Inferencer(folder).predict(image)
    meta = json.loads((folder / "metadata.json").read_text())
    meta["image_threshold"] = first.score  # exactly this image's score: anomalous (>=)
    meta["pixel_threshold"] = float(first.anomaly_map.max())
    (folder / "metadata.json").write_text(json.dumps(meta))
    again = Inferencer(folder).predict(image)
    assert again.is_anomalous is True and again.mask.any()


def test_metadata_carries_format_version_and_colour_scale(exports):
    meta = json.loads((exports["onnx"] / "metadata.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["model_file"] == "model.onnx"
    scale = meta["heat_scale"]
    assert scale["low"] < scale["threshold"] < scale["high"]
    assert scale["threshold"] == meta["pixel_threshold"]
    assert meta["resize"] == [64, 80] and meta["crop"] is None


def _broken(exports, tmp_path, edit) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(exports["onnx"], folder)
    edit(folder)
    return folder


def test_bad_export_folders_stop_with_one_line_naming_the_file(exports, tmp_path):
    with pytest.raises(DeployError, match="is not a folder"):
        Inferencer(tmp_path / "nowhere")
    no_meta = _broken(exports, tmp_path / "a", lambda f: (f / "metadata.json").unlink())
    with pytest.raises(DeployError, match=f"{no_meta / 'metadata.json'} not found"):
        Inferencer(no_meta)
    no_model = _broken(exports, tmp_path / "b", lambda f: (f / "model.onnx").unlink())
    with pytest.raises(DeployError, match=f"{no_model / 'model.onnx'} not found"):
        Inferencer(no_model)

    def newer(folder: Path) -> None:
        meta = json.loads((folder / "metadata.json").read_text())
        (folder / "metadata.json").write_text(json.dumps({**meta, "format_version": 99}))

    future = _broken(exports, tmp_path / "c", newer)
    with pytest.raises(DeployError, match="format_version 99, newer than") as err:
        Inferencer(future)
    assert str(future / "metadata.json") in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DeployError, match="runtime='tensorrt'"):
        Inferencer(exports["onnx"], "tensorrt")


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_a_damaged_model_file_stops_with_one_line_naming_it(exports, tmp_path, runtime):
    if runtime == "openvino" and not _has("openvino"):
        pytest.skip("openvino is not installed (pip install 'cfa-lightning[openvino]')")

    def truncate(folder: Path) -> None:
        graph = folder / "model.onnx"
        graph.write_bytes(graph.read_bytes()[:3000])

    folder = _broken(exports, tmp_path, truncate)
    with pytest.raises(DeployError) as err:
        Inferencer(folder, runtime)
    reason = "Protobuf parsing failed" if runtime == "onnxruntime" else "Model can't be parsed"
    assert str(err.value) == (
        f"{folder / 'model.onnx'} cannot be loaded by {runtime} ({reason}): the file is damaged "
        "or not a model; export the checkpoint again with cfa-export"
    )


def test_a_runtime_not_installed_names_the_extra(exports, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(DeployError, match=r"pip install 'cfa-lightning\[openvino\]'"):
        Inferencer(exports["onnx"], "openvino")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(DeployError, match=r"pip install 'cfa-lightning\[deploy\]'"):
        Inferencer(exports["onnx"], "onnxruntime")


def _no_torch_env(tmp_path: Path) -> dict:
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(NO_TORCH_HOOK)
    return {**os.environ, "PYTHONPATH": str(hook)}


def test_predict_from_an_export_imports_no_torch(exports, tmp_path):
    """cfa-predict model_dir=... under a hook that refuses torch: the files as with ckpt_path=,
    the unreadable file skipped, named and counted."""
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (50, 40), dtype=np.uint8)).save(folder / "b.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cmd = [sys.executable, "-m", "cfa_lightning.predict", f"model_dir={exports['onnx']}",
           f"input={folder}", f"output_dir={out}", "save_npy=true", f"hydra.run.dir={tmp_path}/r"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=_no_torch_env(tmp_path))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "skipped 1 unreadable file(s)" in log and "broken.png" in log
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]).name for r in rows] == ["a.png", "b.jpg"]
    assert all(r["decision"] in {"normal", "anomalous"} for r in rows)
    for stem, shape in {"a": (90, 120), "b": (50, 40)}.items():
        assert np.load(out / f"{stem}_map.npy").shape == shape
        assert Image.open(out / f"{stem}_mask.png").size == shape[::-1]
        overlay = Image.open(out / f"{stem}_overlay.png")  # a caption band above the panel
        assert overlay.width == 3 * shape[1] and overlay.height > shape[0]
        assert overlay.text["image"] == str(folder / f"{stem}.{'png' if stem == 'a' else 'jpg'}")
    # the hook works: the same command with a checkpoint needs torch and fails
    bad = subprocess.run([*cmd[:3], "ckpt_path=x.ckpt", *cmd[4:]], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=_no_torch_env(tmp_path))  # fmt: skip
    assert bad.returncode != 0 and "the torch-free deploy path imported torch" in bad.stderr


def test_predict_command_errors_are_one_line(exports, tmp_path):
    cmd = [sys.executable, "-m", "cfa_lightning.predict", f"input={tmp_path}",
           f"hydra.run.dir={tmp_path}/r"]  # fmt: skip
    for args, message in (([f"model_dir={tmp_path}"], f"{tmp_path / 'metadata.json'} not found"),
                          ([], "give either ckpt_path=")):  # fmt: skip
        proc = subprocess.run([*cmd, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
        assert message in proc.stderr


@pytest.mark.slow
@pytest.mark.real_data
def test_a_fresh_venv_with_the_deploy_extra_scores_shared_images(shared_data, exports, tmp_path):
    """pip install '<checkout>[deploy]' into an empty venv: no torch is installed, and
    cfa-predict model_dir=... scores cookies test images under the no-torch hook."""
    wheels = tmp_path / "wheels"  # built here, offline: setuptools of this environment
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--wheel-dir", wheels, ROOT], check=True, timeout=600)  # fmt: skip
    (wheel,) = wheels.glob("*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
    py = venv / "bin" / "python"
    proc = subprocess.run([py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           f"{wheel}[deploy,openvino]"], capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    freeze = subprocess.run([py, "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    assert "torch" not in freeze.lower(), freeze
    assert "onnxruntime" in freeze and "openvino" in freeze
    images = tmp_path / "images"
    images.mkdir()
    for src in sorted((shared_data / "cookies" / "test").glob("*/*.png"))[::8]:
        shutil.copy(src, images / f"{src.parent.name}_{src.name}")
    (images / "broken.png").write_bytes(b"not an image")
    for fmt, runtime in RUNTIMES:
        out = tmp_path / f"out_{fmt}_{runtime}"
        proc = subprocess.run(
            [venv / "bin" / "cfa-predict", f"model_dir={exports[fmt]}", f"runtime={runtime}",
             f"input={images}", f"output_dir={out}", f"hydra.run.dir={tmp_path}/r"],
            cwd=tmp_path, capture_output=True, text=True, timeout=600, env=_no_torch_env(tmp_path),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "skipped 1 unreadable file(s)" in proc.stdout + proc.stderr
        with open(out / "predictions.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == len(list(images.glob("*"))) - 1
        assert all(r["decision"] in {"normal", "anomalous"} for r in rows)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_runtime_profile_finds_every_stage(exports, runtime, monkeypatch):
    """experiments/runtime_profile.py gives each stage of a real exported model its node time:
    a node named after no stage, or a search counted as maps, leaves a stage empty."""
    if runtime == "openvino" and not _has("openvino"):
        pytest.skip("OpenVINO is not installed")
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    profile = __import__("runtime_profile")
    folder = exports["openvino" if runtime == "openvino" else "onnx"]
    graph = folder / ("model.xml" if runtime == "openvino" else "model.onnx")
    batch = np.random.default_rng(0).random((2, 3, 64, 80)).astype(np.float32)
    stages = (profile.openvino_stages if runtime == "openvino" else profile.onnxruntime_stages)(
        graph, batch, threads=1, repeats=2
    )
    assert all(stages.get(stage, 0.0) > 0.0 for stage in profile.STAGES), stages
    # two calls in one profile, OpenVINO-style names: CFA's own nodes are the search until the
    # first upsampling, and the next call's backbone starts a new search
    call = [("Multiply_1", "Convolution", 1.0), ("__module.model.descriptor/x", "Interpolate", 2.0),
            ("__module.model/aten::addmm/Add", "FullyConnected", 4.0),
            ("__module.model/aten::upsample_bilinear2d", "Interpolate", 8.0),
            ("__module.model.blur/aten::conv2d", "Convolution", 16.0)]  # fmt: skip
    assert profile.grouped(call + call) == {
        "backbone": 2.0, "descriptor": 4.0, "search": 8.0, "maps": 48.0
    }  # fmt: skip


@pytest.fixture(scope="module")
def odd_crop(synthetic_root, tmp_path_factory) -> tuple[Path, Path]:
    """A tiny model trained with resize 96 x 112 and centre crop 65 x 81: both differences are
    odd (31), so a crop offset rounded down (15) and one rounded as torchvision (16) differ."""
    import pytorch_lightning as pl

    from cfa_lightning.data import MVTecDataModule
    from tiny_models import tiny_module

    pl.seed_everything(0)
    out = tmp_path_factory.mktemp("odd_crop")
    dm = MVTecDataModule(str(synthetic_root), "synthetic", image_size=[96, 112], crop_size=[65, 81],
                         batch_size=4, eval_batch_size=4, val_fraction=0.25)  # fmt: skip
    module = tiny_module(input_size=[65, 81])
    trainer = pl.Trainer(default_root_dir=out, max_epochs=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    trainer.save_checkpoint(out / "model.ckpt")
    export(out / "model.ckpt", "onnx", out / "onnx")
    return out / "model.ckpt", out / "onnx"


def test_an_odd_crop_gives_the_same_maps_masks_and_decisions_in_both_paths(odd_crop):
    from cfa_lightning.inference import Predictor

    ckpt, folder = odd_crop
    predictor, inferencer = Predictor.from_checkpoint(ckpt), Inferencer(folder)
    assert inferencer.resize == (96, 112) and inferencer.crop == (65, 81)
    assert (predictor.resize, predictor.crop) == (inferencer.resize, inferencer.crop)
    images = _images() + [np.random.default_rng(3).integers(0, 255, (193, 225, 3), np.uint8)]
    ref, got = predictor.predict_batch(images), inferencer.predict_batch(images)
    assert any(r.mask.any() for r in ref)  # the masks compared are not all empty
    for r, g in zip(ref, got, strict=True):
        rel = np.abs(g.anomaly_map - r.anomaly_map).max() / np.abs(r.anomaly_map).max()
        assert rel < 1e-4, rel
        assert g.score == pytest.approx(r.score, rel=1e-4)
        assert g.is_anomalous == r.is_anomalous
        assert np.array_equal(g.mask, r.mask)


def _flagged_exactly_when_masked(results) -> None:
    for r in results:
        assert r.anomaly_map.shape == r.mask.shape
        assert r.is_anomalous == bool(r.mask.any()), (r.score, r.anomaly_map.max())


def _threshold_pairs(results) -> list[tuple[float, float]]:
    """(image, pixel) thresholds at one image's own peak, and F1-like pairs that differ."""
    scores = sorted(r.score for r in results)
    middle = scores[len(scores) // 2]
    return [(middle, middle), (scores[0], scores[-1] * 2), (scores[-1] * 2, scores[0] / 2),
            (middle, scores[0] / 2)]  # fmt: skip


def test_a_flagged_image_has_a_mask_at_its_own_size_and_only_then(trained_checkpoint, exports,
                                                                  tmp_path):  # fmt: skip
    """Images smaller and larger than the model's 64 x 80 (a smaller image's resized map peaks
    under the image score), thresholds at one image's peak, and pixel thresholds above and below
    the image threshold; in PyTorch and in onnxruntime, each at its own scores."""
    from cfa_lightning.inference import Predictor

    rng = np.random.default_rng(5)
    images = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in
              ((20, 25, 3), (31, 47, 3), (33, 33, 3), (150, 61, 3), (64, 80, 3))]  # fmt: skip
    predictor = Predictor.from_checkpoint(trained_checkpoint)
    cal = predictor.model.calibration
    for image_thr, pixel_thr in _threshold_pairs(predictor.predict_batch(images)):
        cal.image_threshold.fill_(image_thr)
        cal.pixel_threshold.fill_(pixel_thr)
        results = predictor.predict_batch(images)
        _flagged_exactly_when_masked(results)
    folder = tmp_path / "thresholds"
    shutil.copytree(exports["onnx"], folder)
    meta = json.loads((folder / "metadata.json").read_text())
    for image_thr, pixel_thr in _threshold_pairs(Inferencer(folder).predict_batch(images)):
        (folder / "metadata.json").write_text(
            json.dumps({**meta, "image_threshold": image_thr, "pixel_threshold": pixel_thr})
        )
        exported = Inferencer(folder).predict_batch(images)
        _flagged_exactly_when_masked(exported)
    flagged = [r.is_anomalous for r in results + exported]
    assert any(flagged) and not all(flagged)
