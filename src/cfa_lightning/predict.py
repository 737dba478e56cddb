"""Score new images: `python -m cfa_lightning.predict ckpt_path=... input=... output_dir=...`.

Writes per image an overlay (image | heat map | predicted-defect contour), the binary mask as PNG,
optionally the raw map as .npy, and one predictions.csv. Unreadable files are reported by name,
skipped, and counted at the end.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig
from PIL import Image

from .checkpoint import exits_on_checkpoint_error
from .config import CONFIG_DIR
from .data.mvtec import IMAGE_EXTENSIONS, MIN_IMAGE_SIDE
from .data.transforms import load_rgb
from .inference import Predictor
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


def predict(cfg: DictConfig) -> tuple[int, int]:
    """Returns (images scored, files skipped)."""
    predictor = Predictor.from_checkpoint(cfg.ckpt_path, device=cfg.device)
    if not predictor.calibrated:
        log.warning("the checkpoint has no calibrated thresholds: decisions and masks are left out")
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
                scale = HeatScale.from_calibration(predictor.model.calibration)
                scale = scale or HeatScale.spanning([result.anomaly_map])
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
@exits_on_checkpoint_error
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
