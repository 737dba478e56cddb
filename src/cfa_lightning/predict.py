"""Score new images with a checkpoint (PyTorch) or an export (onnxruntime / OpenVINO, no torch):

    python -m cfa_lightning.predict ckpt_path=<last.ckpt> input=... output_dir=...
    python -m cfa_lightning.predict model_dir=<cfa-export folder> runtime=openvino input=...

Writes per image an overlay (a caption naming the image, its score and decision; image | heat map |
predicted-defect contour), the binary mask as PNG, optionally the raw map as .npy, and one
predictions.csv; the log and .hydra/ go to the same folder (run_folder.py). Progress is logged
as it goes, and a summary at the end: images scored, flagged, skipped (unreadable files are named
and skipped), and where the outputs are. With model_dir= this module imports no torch (Hydra,
numpy, Pillow and the runtime only): it runs where only `cfa-lightning[deploy]` is installed.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .config import CONFIG_DIR
from .deploy import DeployError, Inferencer, Prediction, default_threads
from .images import IMAGE_EXTENSIONS, MIN_IMAGE_SIDE, load_rgb
from .visualize import HeatScale, captioned, overlay_panel

log = logging.getLogger("cfa_lightning.predict")
PROGRESS_EVERY_S = 5.0  # at most one progress line per this many seconds (and the first, the last)
LARGE_IMAGE_PIXELS = 12_000_000  # from 4000 x 3000 px on, each step of an image takes seconds


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


class PredictSummary(NamedTuple):
    scored: int
    flagged: int | None  # None: the model has no calibrated thresholds, so no decisions
    skipped: int
    output_dir: Path


class Progress:
    """Progress of a batch in the log: the first file, then at most one line every ``every_s``
    seconds, and the last, with the rate and the time left."""

    def __init__(self, total: int, every_s: float) -> None:
        self.total, self.every_s = total, every_s
        self.start = self.last = time.perf_counter()
        self.done = 0

    def step(self, path: Path, what: str) -> None:
        self.done += 1
        now = time.perf_counter()
        if self.done not in (1, self.total) and now - self.last < self.every_s:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        left = round((self.total - self.done) / rate)
        eta = f", about {left // 60} min {left % 60:02d} s left" if self.done < self.total else ""
        done = f"[{self.done}/{self.total}] {path.name} {what}"
        log.info("%s; %.2f file(s)/s%s", done, rate, eta)


def read_image(path: Path) -> Image.Image | None:
    """The image as 8-bit RGB, or None (logged) when it cannot be read."""
    try:
        return load_rgb(path)
    except (ValueError, OSError) as err:  # FileNotFoundError is an OSError
        reason = err.__cause__ or err  # the decoder's words, without training's advice
        log.error(
            "skipped %s: cannot read it as an image (%s); re-save it as PNG or JPEG, "
            "or leave it out of input=",
            path,
            reason,
        )
        return None


def is_large(image: Image.Image) -> bool:
    return image.width * image.height >= LARGE_IMAGE_PIXELS


def write_outputs(
    cfg: DictConfig,
    out: Path,
    stem: str,
    path: Path,
    image: Image.Image,
    result: Prediction,
    fixed_scale: HeatScale | None,
) -> None:
    """<name>_mask.png, <name>_map.npy (save_npy) and <name>_overlay.png (overlays) of an image;
    for a large image, each step in the log (the overlay alone takes seconds)."""
    large = is_large(image)
    if result.mask is not None:
        Image.fromarray(result.mask.astype(np.uint8) * 255).save(out / f"{stem}_mask.png")
    if cfg.save_npy:
        np.save(out / f"{stem}_map.npy", result.anomaly_map)
    if not cfg.overlays:
        return
    if large:
        log.info("%s: drawing its overlay (%dx%d px)", path.name, 3 * image.width, image.height)
    scale = fixed_scale or HeatScale.spanning([result.anomaly_map])  # uncalibrated: this map's
    panel = overlay_panel(np.asarray(image), scale(result.anomaly_map), result.mask)
    text, colour = caption(path, result)
    info = PngInfo()  # the caption, machine-readable: Image.open(overlay).text
    for key, value in zip(PNG_KEYS, csv_row(path, result), strict=True):
        info.add_text(key, value)
    if large:
        log.info("%s: saving its overlay as PNG", path.name)
    Image.fromarray(captioned(panel, text, colour)).save(out / f"{stem}_overlay.png", pnginfo=info)


# predictions.csv's columns, and the same values' keys in an overlay's PNG text.
CSV_COLUMNS = ("path", "score", "normalized_score", "decision")
PNG_KEYS = ("image", "score", "normalized_score", "decision")


def csv_row(path: Path, result: Prediction) -> list[str]:
    """An image's row of predictions.csv (CSV_COLUMNS), also its overlay's text (PNG_KEYS)."""
    return [str(path), f"{result.score:.6g}", f"{result.normalized_score:.4f}", decision(result)]


def decision(result: Prediction) -> str:
    return {True: "anomalous", False: "normal", None: ""}[result.is_anomalous]


def caption(path: Path, result: Prediction) -> tuple[list[str], tuple[int, int, int]]:
    """The overlay's caption: the image (its folder and name), its score and the decision."""
    name = f"{path.parent.name}/{path.name}" if path.parent.name else path.name
    if result.is_anomalous is None:
        return [name, f"score {result.score:.4g} (uncalibrated: no decision)"], (0, 0, 0)
    score = f"score {result.score:.4g}, normalised {result.normalized_score:.2f}: "
    colour = (200, 0, 0) if result.is_anomalous else (0, 110, 0)
    return [name, score + decision(result).upper()], colour


def predict(cfg: DictConfig) -> PredictSummary:
    """Score every input image, write its outputs, log progress and a summary at the end."""
    predictor, fixed_scale = load_scorer(cfg)
    if not predictor.calibrated:
        log.warning("the model has no calibrated thresholds: decisions and masks are left out")
    paths = resolve_inputs(str(cfg.input), cfg.recursive)
    stems = dict(zip(paths, output_stems(paths), strict=True))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log.info("scoring %d file(s) into %s", len(paths), out)
    rows, skipped, flagged = [], [], 0
    progress = Progress(len(paths), PROGRESS_EVERY_S)
    for start in range(0, len(paths), cfg.batch_size):
        images, chunk = [], []
        for path in paths[start : start + cfg.batch_size]:
            began = time.perf_counter()
            image = read_image(path)
            if image is None:
                skipped.append(path)
                progress.step(path, "skipped")
                continue
            width, height = image.size
            if is_large(image):  # seconds per step: say what is happening
                read_s = time.perf_counter() - began
                log.info(
                    "%s: %dx%d px, read in %.1f s; scoring it, then writing its outputs at this "
                    "size",
                    path.name,
                    width,
                    height,
                    read_s,
                )
            if min(width, height) < MIN_IMAGE_SIDE:
                log.warning(
                    "%s is only %dx%d px; training refuses sides under %d px, so its score and "
                    "map mean little",
                    path,
                    width,
                    height,
                    MIN_IMAGE_SIDE,
                )
            images.append(image)
            chunk.append(path)
        if not images:
            continue
        for path, image, result in zip(chunk, images, predictor.predict_batch(images), strict=True):
            if is_large(image):
                log.info("%s: scored %.4g; writing its outputs", path.name, result.score)
            write_outputs(cfg, out, stems[path], path, image, result, fixed_scale)
            flagged += bool(result.is_anomalous)
            rows.append(csv_row(path, result))
            progress.step(path, "scored")
    with open(out / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(rows)
    decided = flagged if predictor.calibrated else None
    summary = PredictSummary(len(rows), decided, len(skipped), out.resolve())
    log_summary(summary, skipped, cfg)
    return summary


def log_summary(summary: PredictSummary, skipped: list[Path], cfg: DictConfig) -> None:
    """The end of a batch: images scored, flagged and skipped, and where the outputs are."""
    n = summary.scored
    if summary.flagged is None:
        flagged = "no decisions (uncalibrated model)"
    else:
        flagged = f"{summary.flagged} flagged anomalous"
    per_image = {
        "_overlay.png": cfg.overlays,
        "_map.npy": cfg.save_npy,
        "_mask.png": summary.flagged is not None,
    }
    files = ["predictions.csv"] + [
        f"{n} <name>{end}" for end, written in per_image.items() if written and n
    ]
    where = f"outputs in {summary.output_dir}: {', '.join(files)}"
    if HydraConfig.initialized():  # the log and .hydra/: in the same folder unless told otherwise
        run_dir, job = Path(HydraConfig.get().runtime.output_dir), HydraConfig.get().job.name
        same = run_dir.resolve() == summary.output_dir.resolve()
        where += f", {job}.log" if same else f"; the log: {run_dir / f'{job}.log'}"
    if skipped:
        names = ", ".join(p.name for p in skipped[:5])
        names += f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        log.warning(
            "%d image(s) scored, %s, skipped %d unreadable file(s): %s\n%s",
            n,
            flagged,
            len(skipped),
            names,
            where,
        )
    else:
        log.info("%d image(s) scored, %s, none skipped\n%s", n, flagged, where)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
def main(cfg: DictConfig) -> None:
    try:
        predict(cfg)
    except (DeployError, FileNotFoundError) as err:  # one line naming the file or option
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
