"""Score new images with a checkpoint (PyTorch) or an export (onnxruntime / OpenVINO, no torch):

    python -m cfa_lightning.predict ckpt_path=<last.ckpt> input=... output_dir=...
    python -m cfa_lightning.predict model_dir=<cfa-export folder> runtime=openvino input=...

Writes per image an overlay (image | heat map | predicted-defect contour), the binary mask as PNG,
optionally the raw map as .npy, and one predictions.csv. Unreadable files are reported by name,
skipped, and counted at the end. With model_dir= this module imports no torch (Hydra, numpy,
Pillow and the runtime only): it runs where only `cfa-lightning[deploy]` is installed.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
import sys
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig
from PIL import Image

from .config import CONFIG_DIR
from .deploy import DeployError, Inferencer, default_threads
from .images import IMAGE_EXTENSIONS, MIN_IMAGE_SIDE, load_rgb
from .visualize import HeatScale, overlay_panel

log = logging.getLogger("cfa_lightning.predict")


def resolve_inputs(spec: str, recursive: bool = False) -> list[Path]:
    """A file, a folder (its images), or a glob pattern -> sorted image paths."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = path.rglob("*") if recursive else path.iterdir()
        files = [p for p in found if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    else:
        files = [Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file()]
    if not files:
        raise FileNotFoundError(
            f"input={spec!r} matches no image (a file, a folder of {'/'.join(sorted(IMAGE_EXTENSIONS))} "
            "files, or a glob pattern such as 'photos/*.jpg')"
        )
    return sorted(files)


def output_stems(paths: list[Path]) -> list[str]:
    """Output names: the file stem, or, where stems collide, the path below the inputs' common
    folder with '__' for '/' (good/000.png, bad/000.png -> good__000, bad__000)."""
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    common = Path(os.path.commonpath([p.resolve().parent for p in paths]))
    names = []
    for path, stem in zip(paths, stems, strict=True):
        if stems.count(stem) == 1:
            names.append(stem)
            continue
        relative = path.resolve().relative_to(common)
        names.append("__".join([*relative.parent.parts, stem]) + f"_{path.suffix.lstrip('.')}")
    return names


def load_scorer(cfg: DictConfig):
    """The PyTorch `Predictor` (ckpt_path=) or the torch-free `deploy.Inferencer` (model_dir=),
    and the fixed colour scale of its overlays (None: uncalibrated)."""
    ckpt_path, model_dir = cfg.get("ckpt_path"), cfg.get("model_dir")
    if (ckpt_path is None) == (model_dir is None):
        raise DeployError(
            "give either ckpt_path=<checkpoint> (PyTorch) or model_dir=<cfa-export folder> "
            "(onnxruntime / OpenVINO), not both nor neither"
        )
    if model_dir is not None:
        scorer = Inferencer(model_dir, cfg.runtime, cfg.get("threads") or default_threads())
        return scorer, scorer.heat_scale
    from .checkpoint import CheckpointError  # torch: only on this branch
    from .inference import Predictor

    try:
        scorer = Predictor.from_checkpoint(ckpt_path, device=cfg.device)
    except CheckpointError as err:
        raise DeployError(str(err)) from None
    return scorer, HeatScale.from_calibration(scorer.model.calibration)


def predict(cfg: DictConfig) -> tuple[int, int]:
    """Returns (images scored, files skipped)."""
    predictor, fixed_scale = load_scorer(cfg)
    if not predictor.calibrated:
        log.warning("the model has no calibrated thresholds: decisions and masks are left out")
    paths = resolve_inputs(str(cfg.input), cfg.recursive)
    stems = dict(zip(paths, output_stems(paths), strict=True))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, skipped = [], []
    for start in range(0, len(paths), cfg.batch_size):
        images, chunk = [], []
        for path in paths[start : start + cfg.batch_size]:
            try:
                image = load_rgb(path)
            except (ValueError, FileNotFoundError, OSError) as err:
                log.error("skipped %s: %s", path, err)
                skipped.append(path)
                continue
            if min(image.size) < MIN_IMAGE_SIDE:
                log.warning("%s is only %dx%d px; training refuses sides under %d px, so its "
                            "score and map mean little", path, *image.size, MIN_IMAGE_SIDE)  # fmt: skip
            images.append(image)
            chunk.append(path)
        if not images:
            continue
        for path, image, result in zip(chunk, images, predictor.predict_batch(images), strict=True):
            stem = stems[path]
            if result.mask is not None:
                Image.fromarray(result.mask.astype(np.uint8) * 255).save(out / f"{stem}_mask.png")
            if cfg.save_npy:
                np.save(out / f"{stem}_map.npy", result.anomaly_map)
            if cfg.overlays:  # the model's fixed colour scale; uncalibrated: this map's range
                scale = fixed_scale or HeatScale.spanning([result.anomaly_map])
                panel = overlay_panel(np.asarray(image), scale(result.anomaly_map), result.mask)
                Image.fromarray(panel).save(out / f"{stem}_overlay.png")
            rows.append([str(path), f"{result.score:.6g}", f"{result.normalized_score:.4f}",
                         {True: "anomalous", False: "normal", None: ""}[result.is_anomalous]])  # fmt: skip
    with open(out / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "score", "normalized_score", "decision"])
        writer.writerows(rows)
    log.info("scored %d image(s) into %s", len(rows), out)
    if skipped:
        log.warning("skipped %d unreadable file(s): %s", len(skipped), ", ".join(map(str, skipped)))
    return len(rows), len(skipped)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
def main(cfg: DictConfig) -> None:
    try:
        predict(cfg)
    except (DeployError, FileNotFoundError) as err:  # one line naming the file or option
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
