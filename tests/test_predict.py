"""`python -m cfa_lightning.predict` on a folder of mixed sizes and modes with one corrupt file."""

import csv
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from PIL import Image

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
    folder, out = _folder(tmp_path), tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "cfa_lightning.predict", f"ckpt_path={trained_checkpoint}",
         f"input={folder}", f"output_dir={out}", "save_npy=true", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]).name for r in rows] == ["deep16.png", "gray.jpg", "rgb.png", "rgba.png"]
    assert all(r["decision"] in {"normal", "anomalous"} for r in rows)
    log = proc.stdout + proc.stderr
    assert "skipped 1 unreadable file(s)" in log and "broken.png" in log
    maps = {"gray": (50, 50), "rgba": (30, 90), "deep16": (40, 40), "rgb": (64, 80)}
    for stem, shape in maps.items():
        assert np.load(out / f"{stem}_map.npy").shape == shape
        assert Image.open(out / f"{stem}_mask.png").size == shape[::-1]
        assert Image.open(out / f"{stem}_overlay.png").size == (3 * shape[1], shape[0])


def test_a_tiny_image_is_scored_with_a_warning_that_names_it(trained_checkpoint, tmp_path, caplog):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    Image.fromarray(np.full((5, 5, 3), 128, dtype=np.uint8)).save(folder / "tiny.png")
    Image.fromarray(np.full((64, 80, 3), 128, dtype=np.uint8)).save(folder / "fine.png")
    cfg = OmegaConf.create({"ckpt_path": str(trained_checkpoint), "input": str(folder),
                            "output_dir": str(out), "batch_size": 8, "device": "cpu",
                            "save_npy": False, "overlays": False, "recursive": False})  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="cfa_lightning.predict"):
        assert predict(cfg) == (2, 0)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "tiny.png is only 5x5 px" in warned[0]
