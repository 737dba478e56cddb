"""Score images with an exported model, without PyTorch: numpy, Pillow and onnxruntime or OpenVINO.

    from cfa_lightning.deploy import Inferencer
    inferencer = Inferencer("outputs/export/<run>", runtime="onnxruntime")  # or "openvino"
    result = inferencer.predict("part.png")  # a path, a PIL image or a numpy array
    result.score, result.normalized_score, result.is_anomalous, result.anomaly_map, result.mask

An export folder (written by `cfa-export`) holds the graph (model.onnx, or OpenVINO's model.xml
and model.bin) and metadata.json. The graph takes (B, 3, h, w) float32 images in [0, 1] at the
model's input size and returns raw scores, normalised scores and maps (B, h, w). The resize to
that size runs here, on the host, as `Predictor` does it: antialiased bilinear (PIL's filter, the
one torchvision's `antialias=True` reproduces), clamped to [0, 1], then the centre crop. ONNX's
antialiased Resize differs from it (0.07 on [0, 1] pixels at 200 -> 64 px), so it stays out of
the graph. This module imports no torch; tests/test_deploy.py checks it in a venv without it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .images import array_to_pil, load_rgb, to_rgb
from .visualize import HeatScale

FORMAT_VERSION = 1  # of metadata.json; cfa-export writes it, newer ones are refused here
RUNTIMES = ("onnxruntime", "openvino")
MODEL_FILES = {"onnxruntime": ("model.onnx",), "openvino": ("model.xml", "model.onnx")}
EXTRAS = {"onnxruntime": "deploy", "openvino": "openvino"}
# OpenVINO's CPU plugin runs float32 models in bf16 on CPUs with native bf16 (AVX512-BF16, AMX):
# maps with steps of 2^-8 of their value, and scores 0.4% off PyTorch's (measured on an AMD
# Zen 5). Exports are float32 (or INT8 where NNCF put it): run them as saved.
OPENVINO_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}

ImageLike = Image.Image | np.ndarray | str | Path


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


def to_pil(image: ImageLike) -> Image.Image:
    """A path, PIL image or numpy array -> 8-bit RGB PIL image (the rules of images.py)."""
    if isinstance(image, str | Path):
        return load_rgb(image)
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        return array_to_pil(image)
    raise TypeError(f"cannot score an object of type {type(image).__name__}")


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


def centre_crop_box(size: tuple[int, int], crop: tuple[int, int]) -> tuple[int, int]:
    """(top, left) of a centre crop, torchvision's rounding."""
    return int(round((size[0] - crop[0]) / 2.0)), int(round((size[1] - crop[1]) / 2.0))


def preprocess(image: Image.Image, resize: tuple[int, int], crop: tuple[int, int] | None):
    """RGB image -> (3, h, w) float32 in [0, 1]: as data/transforms.ImageMaskTransform does it.

    Scaling to [0, 1] first, then an antialiased bilinear resize per channel on float32
    ("F" mode): PIL's filter, which torchvision's antialias=True reproduces (5e-6 apart).
    """
    pixels = np.asarray(image, dtype=np.float32) / 255.0  # (H0, W0, 3)
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(pixels[..., c]), "F").resize(
            (resize[1], resize[0]), Image.Resampling.BILINEAR))
        for c in range(3)
    ]  # fmt: skip
    x = np.clip(np.stack(channels), 0.0, 1.0)  # (3, H, W)
    if crop is not None:
        top, left = centre_crop_box(resize, crop)
        x = x[:, top : top + crop[0], left : left + crop[1]]
    return np.ascontiguousarray(x, dtype=np.float32)


def _linear_weights(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) bilinear interpolation matrix, half-pixel centres, edges clamped: torch's
    F.interpolate(mode="bilinear", align_corners=False) without antialiasing, also when it
    shrinks (PIL would antialias there)."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    weights = np.zeros((n_out, n_in))
    np.add.at(weights, (np.arange(n_out), i0), 1.0 - frac)
    np.add.at(weights, (np.arange(n_out), i1), frac)
    return weights


def map_to_image(fmap: np.ndarray, size: tuple[int, int], resize, crop) -> np.ndarray:
    """(h, w) map at model resolution -> (H0, W0) float32; outside a centre crop: the lowest value."""
    h0, w0 = size
    if crop is None:
        y0, x0, y1, x1 = 0, 0, h0, w0
    else:
        top, left = centre_crop_box(resize, crop)
        y0, x0 = round(top * h0 / resize[0]), round(left * w0 / resize[1])
        y1 = round((top + crop[0]) * h0 / resize[0])
        x1 = round((left + crop[1]) * w0 / resize[1])
    inner = (
        _linear_weights(y1 - y0, fmap.shape[0]) @ fmap @ _linear_weights(x1 - x0, fmap.shape[1]).T
    )
    full = np.full((h0, w0), fmap.min(), dtype=np.float32)
    full[y0:y1, x0:x1] = inner
    return full


class _OnnxRuntime:
    def __init__(self, path: Path, threads: int | None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.session.run(["scores", "normalized_scores", "maps"], {"images": batch})


class _OpenVINO:
    def __init__(self, path: Path, threads: int | None) -> None:
        import openvino as ov

        config = {**OPENVINO_CONFIG, **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
        self.model = ov.Core().compile_model(str(path), "CPU", config)

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        out = self.model(batch)
        return [out[self.model.output(name)] for name in ("scores", "normalized_scores", "maps")]


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
        results = []
        for pil, score, norm, fmap in zip(pils, scores, normalized, maps, strict=True):
            raw = map_to_image(fmap, pil.size[::-1], self.resize, self.crop)  # (H0, W0)
            if self.calibrated:
                decision, mask = bool(score >= image_thr), raw >= pixel_thr
            else:
                norm, decision, mask = float("nan"), None, None
            results.append(Prediction(float(score), float(norm), decision, raw, mask))
        return results


def default_threads() -> int:
    """The cores this process may use (the affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
