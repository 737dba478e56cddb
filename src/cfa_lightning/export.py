"""Export a trained model with its pre- and postprocessing inside the graph.

    python -m cfa_lightning.export ckpt_path=... format=onnx|torchscript [output_dir=...]

The exported graph takes (B, 3, H, W) float images in [0, 1] of any size (dynamic batch), resizes
them to the training resolution (bilinear; the centre crop too, if training used one),
normalises with the backbone's mean/std, scores, and returns
    scores (B,)  raw image scores        normalized_scores (B,)  threshold at 0.5
    maps (B, h, w)  raw anomaly maps at the model resolution (upsampled + blurred)
A metadata.json beside it states the input size, normalisation, thresholds, backbone, taps,
gamma_c, gamma_d, package version and git revision.
"""

from __future__ import annotations

import copy
import json
import logging
import subprocess
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from . import __version__
from .checkpoint import exits_on_checkpoint_error, load_checkpoint
from .config import CONFIG_DIR
from .models.cfa import CFA
from .sizes import as_size

log = logging.getLogger("cfa_lightning.export")
FORMATS = ("onnx", "torchscript")


class ExportableCFA(nn.Module):
    """Resize (+ crop) -> CFA -> raw and normalised scores and maps, in one graph."""

    def __init__(self, model: CFA, image_size=None, crop_size=None) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).eval()  # the caller's model keeps its chunking
        self.model.chunk_bytes = None  # one block: a loop-free graph (batch size stays dynamic)
        self.resize = (
            as_size(image_size, "data.image_size") if image_size is not None else model.input_size
        )
        self.crop = as_size(crop_size, "data.crop_size") if crop_size is not None else None

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = F.interpolate(images, size=self.resize, mode="bilinear", align_corners=False)
        if self.crop is not None:
            top = (self.resize[0] - self.crop[0]) // 2
            left = (self.resize[1] - self.crop[1]) // 2
            x = x[:, :, top : top + self.crop[0], left : left + self.crop[1]]
        out = self.model(x)
        cal = self.model.calibration
        normalized = cal.normalize(out.image_scores, cal.image_threshold)
        return out.image_scores, normalized, out.maps


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def metadata(wrapper: ExportableCFA, hparams: dict) -> dict:
    model, cal = wrapper.model, wrapper.model.calibration
    return {
        "inputs": {"images": "float32 (B, 3, H, W) in [0, 1], RGB, any H and W"},
        "outputs": {"scores": "(B,)", "normalized_scores": "(B,), threshold at 0.5",
                    "maps": f"(B, {model.input_size[0]}, {model.input_size[1]}) raw anomaly maps"},
        "resize": list(wrapper.resize),
        "crop": list(wrapper.crop) if wrapper.crop else None,
        "input_size": list(model.input_size),
        "normalization": {"mean": model.backbone.mean.flatten().tolist(),
                          "std": model.backbone.std.flatten().tolist()},
        "calibrated": bool(cal.fitted),
        "image_threshold": float(cal.image_threshold),
        "pixel_threshold": float(cal.pixel_threshold),
        "normalization_low": float(cal.low),
        "backbone": model.backbone.name,
        "taps": list(model.backbone.out_indices),
        "gamma_c": hparams.get("gamma_c"),
        "gamma_d": hparams.get("gamma_d"),
        "K": model.K,
        "blur_sigma": model.blur_sigma,
        "package_version": __version__,
        "git_revision": git_revision(),
    }  # fmt: skip


def export(ckpt_path: str | Path, fmt: str, output_dir: str | Path) -> Path:
    from .models.lit_module import CFALitModule

    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}; choose one of {FORMATS}")
    ckpt = load_checkpoint(ckpt_path)
    module = CFALitModule.from_checkpoint_dict(ckpt, ckpt_path)
    data = ckpt.get("datamodule_hyper_parameters", {})
    wrapper = ExportableCFA(module.model, data.get("image_size"), data.get("crop_size")).eval()
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    example = torch.rand(2, 3, *wrapper.resize)
    if fmt == "onnx":
        path = out_dir / "model.onnx"
        try:
            torch.onnx.export(
                wrapper, (example,), str(path), dynamo=False, opset_version=17,
                input_names=["images"], output_names=["scores", "normalized_scores", "maps"],
                dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "scores": {0: "batch"},
                              "normalized_scores": {0: "batch"}, "maps": {0: "batch"}},
            )  # fmt: skip
        except ImportError as err:
            raise ImportError(
                "ONNX export needs the export extra: pip install 'cfa-lightning[export]'"
            ) from err
    else:
        path = out_dir / "model.torchscript.pt"
        with torch.no_grad():
            traced = torch.jit.trace(wrapper, (example,), check_trace=False)
        traced.save(str(path))
    (out_dir / "metadata.json").write_text(
        json.dumps(metadata(wrapper, dict(module.hparams)), indent=2) + "\n"
    )
    log.info("exported %s and metadata.json to %s", path.name, out_dir)
    return path


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
@exits_on_checkpoint_error
def main(cfg: DictConfig) -> None:
    export(cfg.ckpt_path, cfg.format, cfg.output_dir)


if __name__ == "__main__":
    main()
