"""Export a trained model for deployment: a graph plus metadata.json, scored by deploy.Inferencer.

    python -m cfa_lightning.export ckpt_path=... format=onnx|openvino|torchscript \
        [quantize=int8 calibration_dir=<training images>] [output_dir=...]

The graph takes (B, 3, h, w) float images in [0, 1] at the model's input size (dynamic batch),
already resized (and centre-cropped) like training: geometry.preprocess does that on the host.
It normalises with the backbone's mean/std, scores, and returns
    scores (B,)  raw image scores        normalized_scores (B,)  threshold at 0.5
    maps (B, h, w)  raw anomaly maps at the model resolution (upsampled + blurred)
metadata.json states the format version, the resize and crop, the thresholds and normalisation,
the overlays' colour scale, the backbone, taps, gamma_c, gamma_d, package version and git revision.

format=openvino converts with `openvino.convert_model` and saves float32 IR (model.xml/.bin);
quantize=int8 then applies NNCF post-training quantisation, calibrated on training images only.
"""

from __future__ import annotations

import copy
import json
import logging
import subprocess
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from . import __version__
from .checkpoint import CheckpointError, exits_on_checkpoint_error, load_checkpoint
from .config import CONFIG_DIR
from .deploy import FORMAT_VERSION, OUTPUTS
from .geometry import preprocess
from .images import IMAGE_EXTENSIONS, load_rgb
from .models.cfa import CFA
from .sizes import trained_sizes
from .utils import writable_folder
from .visualize import HeatScale

log = logging.getLogger("cfa_lightning.export")
FORMATS = {"onnx": "model.onnx", "openvino": "model.xml", "torchscript": "model.torchscript.pt"}
# What INT8 quantises: the backbone's layers only (descriptor, search and map stay float32), or all.
QUANTIZE_SCOPES = ("backbone", "all")
# OpenVINO names a node by the module that ran it: "__module.model/aten::addmm/MatMul" (the
# search), "__module.model.descriptor/...", "__module.model.blur/..."; the backbone's convolutions
# are "__module.model.backbone..." or, BatchNorm folded in, "Multiply_<n>".
NOT_BACKBONE = r"^__module(\.model(\.(descriptor|blur|calibration|bank))?)?/.*"


class ExportableCFA(nn.Module):
    """CFA -> raw and normalised scores and maps, in one graph (input at the model's size)."""

    def __init__(self, model: CFA) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).eval()  # the caller's model keeps its chunking
        self.model.chunk_bytes = None  # one block: a loop-free graph (batch size stays dynamic)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.model(images)  # (B, 3, h, w) in [0, 1] -> scores (B,), maps (B, h, w)
        cal = self.model.calibration
        normalized = cal.normalize(out.image_scores, cal.image_threshold)
        return out.image_scores, normalized, out.maps


def git_revision() -> str:
    here = Path(__file__).parent
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return done.stdout.strip()


def _finite(value: Tensor) -> float | None:
    return float(value) if torch.isfinite(value) else None  # JSON has no NaN


def metadata(model: CFA, hparams: dict, data: dict, fmt: str) -> dict:
    cal = model.calibration
    resize, crop = trained_sizes(data, model.input_size)
    scale = HeatScale.from_calibration(cal)
    h, w = model.input_size
    images = (
        f"float32 (B, 3, {h}, {w}) in [0, 1], RGB: resized to `resize` (antialiased bilinear), "
        "clamped, centre-cropped to `crop`"
    )
    outputs = {
        "scores": "(B,)",
        "normalized_scores": "(B,), threshold at 0.5",
        "maps": f"(B, {h}, {w}) raw anomaly maps",
    }
    mean, std = model.backbone.mean.flatten().tolist(), model.backbone.std.flatten().tolist()
    return {
        "format_version": FORMAT_VERSION,
        "format": fmt,
        "model_file": FORMATS[fmt],
        "precision": "fp32",
        "inputs": {"images": images},
        "outputs": outputs,
        "resize": list(resize),
        "crop": list(crop) if crop else None,
        "input_size": [h, w],
        "normalization": {"mean": mean, "std": std, "in_graph": True},
        "calibrated": bool(cal.fitted),
        "image_threshold": _finite(cal.image_threshold),
        "pixel_threshold": _finite(cal.pixel_threshold),
        "normalization_low": float(cal.low),
        "heat_scale": scale._asdict() if scale else None,
        "backbone": model.backbone.name,
        "taps": list(model.backbone.out_indices),
        "gamma_c": hparams.get("gamma_c"),
        "gamma_d": hparams.get("gamma_d"),
        "bank": model.bank.construction,
        "bank_centres": model.bank.n_centres,
        "K": model.K,
        "blur_sigma": model.blur_sigma,
        "package_version": __version__,
        "git_revision": git_revision(),
    }


def training_images(data: dict, calibration_dir: str | Path | None) -> list[Path]:
    """Images to calibrate INT8 on: `calibration_dir`, else the training split of the data the
    checkpoint was trained on (the images its bank was built from: no validation or test image)."""
    if calibration_dir is None:
        return training_split(data)
    folder = Path(calibration_dir)
    images = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise ValueError(
            f"calibration_dir={str(folder)!r} holds no image; give a folder of training images "
            "(never the test set) for quantize=int8"
        )
    return images


def training_split(data: dict) -> list[Path]:
    """The training images of the datamodule described by a checkpoint's data hyper-parameters:
    the same scan and seeded split, so the held-out validation and test images stay out."""
    from .data import FolderDataModule, MVTecDataModule
    from .data.verify import verify_samples

    if not data.get("root"):
        raise ValueError(
            "the checkpoint records no training data (no data.root in its datamodule "
            "hyper-parameters); give calibration_dir=<a folder of training images> for "
            "quantize=int8"
        )
    skip_bad = bool(data.get("skip_bad_images"))
    split = {k: data[k] for k in ("val_fraction", "split_seed") if data.get(k) is not None}
    if data.get("normal_dir"):  # data=folder
        folders = (
            "normal_dir",
            "abnormal_dirs",
            "mask_dir",
            "normal_test_dir",
            "val_dir",
            "test_fraction",
        )
        split.update({k: data[k] for k in folders if data.get(k) is not None})
        datamodule = FolderDataModule(root=data["root"], **split)
    else:  # data=mvtec and the MVTec-layout synthetic set
        datamodule = MVTecDataModule(root=data["root"], category=data.get("category", ""), **split)
    try:
        train, _, _ = datamodule.scan()
    except FileNotFoundError as err:
        raise ValueError(
            f"{err} (looking for the training images to calibrate INT8 on; or give "
            "calibration_dir=<a folder of training images>)"
        ) from None
    if skip_bad:  # the run left unreadable files out of training
        train = verify_samples(train, skip_bad=True)
    return [Path(s.path) for s in train]


def _onnx(wrapper: ExportableCFA, example: Tensor, path: Path) -> None:
    batch_axis = {name: {0: "batch"} for name in ("images", *OUTPUTS)}  # dim 0 is dynamic
    try:
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["images"],
            output_names=list(OUTPUTS),
            dynamic_axes=batch_axis,
        )
    except ImportError as err:
        raise ImportError(
            "ONNX export needs the export extra: pip install 'cfa-lightning[export]'"
        ) from err


def _openvino(wrapper: ExportableCFA, example: Tensor):
    try:
        import openvino as ov
    except ImportError as err:
        raise ImportError(
            "format=openvino needs OpenVINO: pip install 'cfa-lightning[openvino]'"
        ) from err
    traced = torch.jit.trace(wrapper, (example,), check_trace=False)  # the graph ONNX gets
    model = ov.convert_model(
        traced, example_input=example, input=[ov.PartialShape([-1, *example.shape[1:]])]
    )
    for output, name in zip(model.outputs, OUTPUTS, strict=True):
        output.get_tensor().set_names({name})
    return model


def quantize_int8(model, images: list[Path], resize, crop, scope: str, subset_size: int):
    """NNCF post-training INT8 quantisation of an OpenVINO model, calibrated on `images`."""
    try:
        import nncf
    except ImportError as err:
        raise ImportError("quantize=int8 needs NNCF: pip install 'cfa-lightning[int8]'") from err
    if scope not in QUANTIZE_SCOPES:
        raise ValueError(f"quantize_scope={scope!r}; choose one of {QUANTIZE_SCOPES}")

    def to_input(path: Path) -> np.ndarray:
        return preprocess(load_rgb(path), resize, crop)[None]  # (1, 3, h, w)

    ignored = None
    if scope == "backbone":  # the nodes of CFA itself, its descriptor and blur stay float32
        ignored = nncf.IgnoredScope(patterns=[NOT_BACKBONE], validate=False)
    dataset = nncf.Dataset(images, to_input)
    return nncf.quantize(
        model, dataset, subset_size=min(subset_size, len(images)), ignored_scope=ignored
    )


def export(
    ckpt_path: str | Path,
    fmt: str,
    output_dir: str | Path,
    quantize: str | None = None,
    calibration_dir: str | Path | None = None,
    quantize_scope: str = "backbone",
    subset_size: int = 300,
) -> Path:
    """Export a checkpoint (see export_model); resize, crop and training folder come from it."""
    from .models.lit_module import CFALitModule

    ckpt = load_checkpoint(ckpt_path)
    module = CFALitModule.from_checkpoint_dict(ckpt, ckpt_path)
    data = ckpt.get("datamodule_hyper_parameters", {})
    return export_model(
        module.model,
        dict(module.hparams),
        data,
        fmt,
        output_dir,
        quantize,
        calibration_dir,
        quantize_scope,
        subset_size,
    )


def export_model(
    model: CFA,
    hparams: dict,
    data: dict,
    fmt: str,
    output_dir: str | Path,
    quantize: str | None = None,
    calibration_dir: str | Path | None = None,
    quantize_scope: str = "backbone",
    subset_size: int = 300,
) -> Path:
    """Write the graph and metadata.json of a fitted model to output_dir; returns the graph's path."""
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}; choose one of {', '.join(FORMATS)}")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize={quantize!r}; choose null or int8")
    if quantize and fmt != "openvino":
        raise ValueError("quantize=int8 needs format=openvino (NNCF quantises OpenVINO IR)")
    if not bool(model.bank.fitted):  # the traced graph leaves CFA's own check out
        raise ValueError(
            "the memory bank is not built; train the model or load a trained checkpoint"
        )
    out_dir = writable_folder(output_dir)  # before the export's work, not after it
    wrapper = ExportableCFA(model).eval()
    wrapper.model.bank.search_index()  # built once here: the trace reads it, no shape branch
    meta = metadata(model, hparams, data, fmt)
    path = out_dir / FORMATS[fmt]
    example = torch.rand(2, 3, *model.input_size)
    if fmt == "onnx":
        _onnx(wrapper, example, path)
    elif fmt == "openvino":
        with torch.no_grad():
            ov_model = _openvino(wrapper, example)
        if quantize:
            images = training_images(data, calibration_dir)
            resize = tuple(meta["resize"])
            crop = tuple(meta["crop"]) if meta["crop"] else None
            ov_model = quantize_int8(ov_model, images, resize, crop, quantize_scope, subset_size)
            calibration = {
                "folder": str(images[0].parent),
                "images": len(images),
                "used": min(subset_size, len(images)),
            }
            meta.update(precision="int8", quantize_scope=quantize_scope, calibration=calibration)
        import openvino as ov

        ov.save_model(ov_model, str(path), compress_to_fp16=False)  # fp32 weights stay fp32
    else:
        with torch.no_grad():
            traced = torch.jit.trace(wrapper, (example,), check_trace=False)
        traced.save(str(path))
    (out_dir / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("exported %s and metadata.json to %s", path.name, out_dir)
    return path


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
@exits_on_checkpoint_error
def main(cfg: DictConfig) -> None:
    try:
        export(
            cfg.ckpt_path,
            cfg.format,
            cfg.output_dir,
            cfg.quantize,
            cfg.calibration_dir,
            cfg.quantize_scope,
            cfg.calibration_subset,
        )
    except (ValueError, ImportError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
