"""Score images with an exported model, without PyTorch: numpy, Pillow and onnxruntime or OpenVINO.

    from cfa_lightning.deploy import Inferencer
    inferencer = Inferencer("outputs/export/<run>", runtime="onnxruntime")  # or "openvino"
    result = inferencer.predict("part.png")  # a path, a PIL image or a numpy array
    result.score, result.normalized_score, result.is_anomalous, result.anomaly_map, result.mask

An export folder (written by `cfa-export`) holds the graph (model.onnx, or OpenVINO's model.xml
and model.bin) and metadata.json. The graph takes (B, 3, h, w) float32 images in [0, 1] at the
model's input size and returns raw scores, normalised scores and maps (B, h, w). The resize to
that size, the crop and the way back run here, on the host, by geometry.py, which `Predictor`
uses too: antialiased bilinear (PIL's filter, the one torchvision's `antialias=True` reproduces),
clamped to [0, 1], then the centre crop. ONNX's antialiased Resize differs from it (0.07 on
[0, 1] pixels at 200 -> 64 px), so it stays out of the graph. This module imports no torch;
tests/test_deploy.py checks it in a venv without it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .geometry import map_to_image, mask_to_image, preprocess
from .images import ImageLike, to_pil
from .visualize import HeatScale

FORMAT_VERSION = 1  # of metadata.json; cfa-export writes it, newer ones are refused here
RUNTIMES = ("onnxruntime", "openvino")
MODEL_FILES = {"onnxruntime": ("model.onnx",), "openvino": ("model.xml", "model.onnx")}
EXTRAS = {"onnxruntime": "deploy", "openvino": "openvino"}
OUTPUTS = ("scores", "normalized_scores", "maps")  # the graph's outputs, as cfa-export names them
# OpenVINO's CPU plugin runs float32 models in bf16 on CPUs with native bf16 (AVX512-BF16, AMX):
# maps with steps of 2^-8 of their value, and scores 0.4% off PyTorch's. Exports are float32 (or INT8 where NNCF put it): run them as saved.
OPENVINO_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}


class DeployError(ValueError):
    """A model (export folder, runtime, checkpoint) that cannot be used; the message names the
    file or option and what to do."""


@dataclass
class Prediction:
    """What both `Inferencer` and `inference.Predictor` return."""

    score: float  # raw image score (max of the map)
    normalized_score: float  # in [0, 1], threshold at 0.5; nan if the model is not calibrated
    is_anomalous: bool | None  # None if the model is not calibrated
    anomaly_map: np.ndarray  # (H, W) float32 raw map at the input image's resolution
    mask: np.ndarray | None  # (H, W) bool predicted defect pixels; None if not calibrated


def read_metadata(model_dir: str | Path) -> dict[str, Any]:
    """metadata.json of an export folder, checked: present, JSON, a format version we read."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise DeployError(f"model_dir={str(folder)!r} is not a folder; give a cfa-export output")
    path = folder / "metadata.json"
    if not path.is_file():
        raise DeployError(
            f"{path} not found: {folder} is not an export folder (cfa-export ckpt_path=... writes one)"
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DeployError(f"{path} is not readable JSON: {err}") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if not isinstance(version, int):
        raise DeployError(
            f"{path} has no format_version: an export from before cfa-lightning 0.2; export "
            "the checkpoint again with cfa-export"
        )
    if version > FORMAT_VERSION:
        raise DeployError(
            f"{path} has format_version {version}, newer than this cfa-lightning reads "
            f"({FORMAT_VERSION}); upgrade it: pip install -U 'cfa-lightning[deploy]'"
        )
    return meta


def model_file(model_dir: str | Path, meta: dict[str, Any], runtime: str) -> Path:
    """The graph file a runtime reads: the one metadata names, if that runtime reads its format."""
    named = Path(model_dir) / meta["model_file"]
    if named.name not in MODEL_FILES[runtime]:
        raise DeployError(
            f"{named} is {named.suffix[1:]}, which runtime={runtime} cannot read; use "
            "runtime=openvino, or export with format=onnx"
        )
    if not named.is_file():
        raise DeployError(f"{named} not found (named by {Path(model_dir) / 'metadata.json'})")
    return named


def to_prediction(
    score: float,
    normalized: float,
    fmap: np.ndarray,
    size: tuple[int, int],
    resize: tuple[int, int],
    crop: tuple[int, int] | None,
    thresholds: tuple[float, float] | None,
) -> Prediction:
    """A model's output for one image -> what the user gets, at the image's (H0, W0) ``size``.

    fmap: (h, w) map at model resolution; thresholds: (image, pixel), None if uncalibrated.
    Decided at model resolution, then mapped back: flagged when score >= image threshold (the
    rule of metrics.is_anomalous); the mask holds the pixels >= the pixel threshold of a flagged
    image, and at least its peak (the F1 pixel threshold may lie above the image score); an
    unflagged image has none. So an image is flagged exactly when its mask is not empty, at
    the model's resolution and, through geometry.mask_to_image, at the image's.
    """
    fmap = np.asarray(fmap, dtype=np.float32)
    raw = map_to_image(fmap, size, resize, crop)  # (H0, W0)
    if thresholds is None:
        return Prediction(float(score), float("nan"), None, raw, None)
    image_thr, pixel_thr = thresholds
    flagged = bool(score >= image_thr)
    if flagged:
        mask = fmap >= min(pixel_thr, float(fmap.max()))  # (h, w), never empty
    else:
        mask = np.zeros(fmap.shape, dtype=bool)
    image_mask = mask_to_image(mask, size, resize, crop)  # (H0, W0)
    return Prediction(float(score), float(normalized), flagged, raw, image_mask)


def unreadable_model(path: Path, runtime: str, err: Exception) -> DeployError:
    """A graph file the runtime cannot load, in one line with the runtime's own reason: its last
    line (OpenVINO's stack of "Exception from ..." lines ends with it), after onnxruntime's
    "Load model from <path> failed:"."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    reason = lines[-1] if lines else type(err).__name__
    reason = (reason.rpartition(" failed:")[2].strip() or reason).rstrip(".")
    return DeployError(
        f"{path} cannot be loaded by {runtime} ({reason}): the file is damaged or not a model; "
        "export the checkpoint again with cfa-export"
    )


class _OnnxRuntime:
    def __init__(self, path: Path, threads: int | None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # InvalidProtobuf, InvalidGraph, ...: no common base class
            raise unreadable_model(path, "onnxruntime", err) from None

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.session.run(list(OUTPUTS), {"images": batch})


class _OpenVINO:
    def __init__(self, path: Path, threads: int | None) -> None:
        import openvino as ov

        config = {**OPENVINO_CONFIG, **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
        try:
            self.model = ov.Core().compile_model(str(path), "CPU", config)
        except RuntimeError as err:
            raise unreadable_model(path, "openvino", err) from None

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        out = self.model(batch)
        return [out[self.model.output(name)] for name in OUTPUTS]


def load_runtime(runtime: str, path: Path, threads: int | None = None):
    """A callable (B, 3, h, w) float32 -> [scores (B,), normalized (B,), maps (B, h, w)]."""
    try:
        return (_OnnxRuntime if runtime == "onnxruntime" else _OpenVINO)(path, threads)
    except ImportError:
        raise DeployError(
            f"runtime={runtime} is not installed: pip install 'cfa-lightning[{EXTRAS[runtime]}]'"
        ) from None


class Inferencer:
    """An export folder in a runtime: resize (and crop) like training, score in batches, maps and
    masks back at each image's own size; decisions by `score >= threshold`, the rule of
    metrics.is_anomalous."""

    def __init__(
        self, model_dir: str | Path, runtime: str = "onnxruntime", threads: int | None = None
    ) -> None:
        if runtime not in RUNTIMES:
            raise DeployError(f"runtime={runtime!r}; choose one of {', '.join(RUNTIMES)}")
        self.metadata = read_metadata(model_dir)
        self.runtime = runtime
        self.run = load_runtime(runtime, model_file(model_dir, self.metadata, runtime), threads)
        meta = self.metadata
        self.resize = tuple(meta["resize"])
        self.crop = tuple(meta["crop"]) if meta["crop"] else None
        self.calibrated = bool(meta["calibrated"])
        scale = meta.get("heat_scale")
        self.heat_scale = HeatScale(**scale) if scale else None  # None: uncalibrated

    def predict(self, image: ImageLike) -> Prediction:
        return self.predict_batch([image])[0]

    def predict_batch(self, images: list[ImageLike]) -> list[Prediction]:
        pils = [to_pil(im) for im in images]
        batch = np.stack([preprocess(im, self.resize, self.crop) for im in pils])  # (B, 3, h, w)
        scores, normalized, maps = self.run(batch)
        image_thr, pixel_thr = self.metadata["image_threshold"], self.metadata["pixel_threshold"]
        thresholds = (image_thr, pixel_thr) if self.calibrated else None
        rows = zip(pils, scores, normalized, maps, strict=True)
        return [
            to_prediction(score, norm, fmap, pil.size[::-1], self.resize, self.crop, thresholds)
            for pil, score, norm, fmap in rows
        ]


def default_threads() -> int:
    """The cores this process may use (the affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
