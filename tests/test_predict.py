"""`python -m cfa_lightning.predict` on a folder of mixed sizes and modes with one corrupt file."""

import csv
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from cfa_lightning import predict as predict_module
from cfa_lightning.predict import output_stems, predict, resolve_inputs

ROOT = Path(__file__).resolve().parents[1]


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "in put"  # a space in the path
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(folder / "rgb.png")
    Image.fromarray(rng.integers(0, 255, (50, 50), dtype=np.uint8)).save(folder / "gray.jpg")
    Image.fromarray(rng.integers(0, 255, (30, 90, 4), dtype=np.uint8)).save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 65535, (40, 40), dtype=np.uint16)).save(folder / "deep16.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_resolve_inputs_and_unique_stems(tmp_path):
    folder = _folder(tmp_path)
    found = resolve_inputs(str(folder))
    assert [p.name for p in found] == [
        "broken.png",
        "deep16.png",
        "gray.jpg",
        "rgb.png",
        "rgba.png",
    ]
    assert resolve_inputs(str(folder / "*.jpg")) == [folder / "gray.jpg"]
    assert output_stems([Path("a.png"), Path("a.jpg"), Path("b.png")]) == ["a_png", "a_jpg", "b"]
    assert output_stems([tmp_path / "good" / "0.png", tmp_path / "bad" / "0.png"]) == [
        "good__0_png",
        "bad__0_png",
    ]


def test_predict_command_on_a_mixed_folder(trained_checkpoint, tmp_path):
    """Run from another folder with output_dir= only: the outputs, the log and .hydra/ all land in
    output_dir, and nothing in ./outputs."""
    folder, out, cwd = _folder(tmp_path), tmp_path / "out", tmp_path / "cwd"
    cwd.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "cfa_lightning.predict", f"ckpt_path={trained_checkpoint}",
         f"input={folder}", f"output_dir={out}", "save_npy=true"],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]).name for r in rows] == ["deep16.png", "gray.jpg", "rgb.png", "rgba.png"]
    assert all(r["decision"] in {"normal", "anomalous"} for r in rows)
    log = proc.stdout + proc.stderr
    assert "broken.png: cannot read it as an image" in log and "dataset folder" not in log
    flagged = sum(r["decision"] == "anomalous" for r in rows)
    assert (
        f"4 image(s) scored, {flagged} flagged anomalous, skipped 1 unreadable file(s): broken.png"
        in log
    )
    assert f"outputs in {out}: predictions.csv, 4 <name>_overlay.png, 4 <name>_map.npy" in log
    # one run, one folder: the log and .hydra beside the outputs
    assert (out / "predict.log").is_file() and (out / ".hydra" / "config.yaml").is_file()
    assert "4 image(s) scored" in (out / "predict.log").read_text()
    assert list(cwd.iterdir()) == []
    maps = {"gray": (50, 50), "rgba": (30, 90), "deep16": (40, 40), "rgb": (64, 80)}
    for row in rows:  # each overlay names its image and score, as predictions.csv does
        stem = Path(row["path"]).stem
        overlay = Image.open(out / f"{stem}_overlay.png")
        assert overlay.text == {"image": row["path"], "score": row["score"],
                                "normalized_score": row["normalized_score"],
                                "decision": row["decision"]}  # fmt: skip
        h, w = maps[stem]
        assert overlay.width == 3 * w and overlay.height > h  # a caption band above the panel
        assert np.load(out / f"{stem}_map.npy").shape == (h, w)
        assert Image.open(out / f"{stem}_mask.png").size == (w, h)


def _predict_cfg(checkpoint: Path, folder: Path, out: Path, **kw) -> DictConfig:
    return OmegaConf.create({"ckpt_path": str(checkpoint), "input": str(folder),
                             "output_dir": str(out), "batch_size": 8, "device": "cpu",
                             "save_npy": False, "overlays": False, "recursive": False, **kw})  # fmt: skip


def test_progress_and_the_steps_of_a_large_image_are_logged(trained_checkpoint, tmp_path, caplog,
                                                            monkeypatch):  # fmt: skip
    """A line per file (no throttle here), and for an image over LARGE_IMAGE_PIXELS (here 5000 px:
    rgb.png, 64 x 80) each of its steps, the long ones announced before they start."""
    monkeypatch.setattr(predict_module, "PROGRESS_EVERY_S", 0.0)
    monkeypatch.setattr(predict_module, "LARGE_IMAGE_PIXELS", 5000)
    folder = _folder(tmp_path)
    with caplog.at_level(logging.INFO, logger="cfa_lightning.predict"):
        summary = predict(_predict_cfg(trained_checkpoint, folder, tmp_path / "out", overlays=True))
    assert (summary.scored, summary.skipped, summary.output_dir) == (4, 1, tmp_path / "out")
    lines = [r.getMessage() for r in caplog.records]
    progress = [line for line in lines if line.startswith("[")]
    assert [line.split("]")[0] + "]" for line in progress] == [f"[{i}/5]" for i in range(1, 6)]
    assert progress[0].startswith("[1/5] broken.png skipped;")
    large = [line for line in lines if line.startswith("rgb.png: ")]
    starts = ("rgb.png: 80x64 px, read in", "rgb.png: scored", "rgb.png: drawing its overlay "
              "(240x64 px)", "rgb.png: saving its overlay as PNG")  # fmt: skip
    assert len(large) == len(starts) and all(map(str.startswith, large, starts)), large
    assert not any(line.startswith(("gray.jpg: ", "deep16.png: ")) for line in lines)  # small


def test_progress_lines_are_throttled():
    progress = predict_module.Progress(total=5, every_s=3600.0)
    logger = logging.getLogger("cfa_lightning.predict")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        for i in range(5):
            progress.step(Path(f"{i}.png"), "scored")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert [line.split(";")[0] for line in seen] == ["[1/5] 0.png scored", "[5/5] 4.png scored"]
    assert "left" in seen[0] and "left" not in seen[1]


def test_a_tiny_image_is_scored_with_a_warning_that_names_it(trained_checkpoint, tmp_path, caplog):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    Image.fromarray(np.full((5, 5, 3), 128, dtype=np.uint8)).save(folder / "tiny.png")
    Image.fromarray(np.full((64, 80, 3), 128, dtype=np.uint8)).save(folder / "fine.png")
    cfg = _predict_cfg(trained_checkpoint, folder, out)
    with caplog.at_level(logging.WARNING, logger="cfa_lightning.predict"):
        summary = predict(cfg)
    assert (summary.scored, summary.skipped) == (2, 0)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "tiny.png is only 5x5 px" in warned[0]
