"""The end of a training run: the summary (epoch chosen and why, checkpoint, test metrics, run
folder), the selection curve PNG, and Lightning's stop line in trained epochs."""

from __future__ import annotations

import logging

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from cfa_lightning.models.untrained_epoch import UntrainedEpoch
from cfa_lightning.report import CURVE_FILE, draw_selection_curve, epochs_as_trained, finish

CURVE = [[0, 0.61], [1, 0.60], [2, 0.58]]
METRICS = {"test/image_AUROC": 1.0, "test/pixel_AUPRO": 0.9077, "test/pixel_F1max_threshold": 23.1}


def _best_val(epoch: int, stopped: int, early: bool) -> dict:
    return {"rule": "best_val", "epoch": epoch, "stopped_epoch": stopped, "metric": "val/pixel_AUPRO",
            "mode": "max", "value": dict(CURVE)[epoch], "early_stopped": early, "patience": 1,
            "checkpoint": f"/runs/x/checkpoints/epoch_{epoch:03d}.ckpt", "val_curve": CURVE}  # fmt: skip


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _summary(tmp_path, selection, metrics=METRICS, max_epochs=2, refit=False) -> tuple[str, object]:
    log, lines = logging.getLogger("test_report"), _Lines()
    log.addHandler(lines)
    log.setLevel(logging.INFO)
    try:
        curve = finish(selection, metrics, tmp_path, "val/pixel_AUPRO", max_epochs, refit, log)
    finally:
        log.removeHandler(lines)
    (text,) = lines.lines
    return text, curve


def test_the_summary_says_epoch_0_is_the_un_adapted_model_and_why_training_stopped(tmp_path):
    text, curve = _summary(tmp_path, _best_val(0, 1, early=True))
    lines = dict(line.split(maxsplit=1) for line in text.splitlines()[1:] if line.startswith("  "))
    assert lines["chosen"] == "epoch 0, the un-adapted model (epoch 0 trains nothing)"
    assert lines["why"].startswith("the best val/pixel_AUPRO on validation, 0.6100, of epochs 0-1")
    assert "no training epoch improved on it" in lines["why"]
    assert lines["stopped"].startswith("early, after epoch 1: 1 validated epoch(s) without")
    assert lines["checkpoint"] == "/runs/x/checkpoints/epoch_000.ckpt"
    assert lines["test"] == "test/image_AUROC 1.0000, test/pixel_AUPRO 0.9077"  # no thresholds
    assert lines["curve"] == str(tmp_path / CURVE_FILE) == str(curve) and curve.is_file()
    assert lines["run"] == f"folder  {tmp_path} (metrics.json, checkpoints/, logs)"


def test_the_summary_of_a_full_run_the_last_epoch_and_a_refit(tmp_path):
    text, _ = _summary(tmp_path, _best_val(2, 2, early=False))
    assert "chosen      epoch 2\n" in text and "un-adapted" not in text
    assert "stopped     at trainer.max_epochs=2 (epochs 1-2 trained)\n" in text
    text, _ = _summary(tmp_path, _best_val(0, 2, early=True))  # patience out at the cap: not early
    assert (
        "stopped     at trainer.max_epochs=2 (epochs 1-2 trained), where early stopping's " in text
    )
    last = {"rule": "last", "epoch": 30, "stopped_epoch": 30, "checkpoint": "/r/last.ckpt"}
    text, curve = _summary(tmp_path / "paper", last, metrics={}, max_epochs=30)
    assert "why         the last epoch (model_selection=last)" in text
    assert "checkpoint  /r/last.ckpt" in text and "test        not run" in text
    assert curve is None and "curve       none" in text and not (tmp_path / "paper").exists()
    text, _ = _summary(tmp_path, _best_val(1, 2, early=True), refit=True)
    assert "retrained on all of train/good for 1 epoch(s) (refit=true)" in text
    assert f"checkpoint  {tmp_path / 'checkpoints' / 'refit.ckpt'}" in text


def _red_columns(path) -> np.ndarray:
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    red = (rgb[..., 0] > 180) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)  # (H, W)
    return np.nonzero(red.any(axis=0))[0]


def test_the_curve_marks_the_chosen_epoch(tmp_path):
    first = draw_selection_curve(CURVE, 0, "val/pixel_AUPRO", tmp_path / "a.png")
    last = draw_selection_curve(CURVE, 2, "val/pixel_AUPRO", tmp_path / "b.png")
    none = draw_selection_curve(CURVE, None, "val/pixel_AUPRO", tmp_path / "c.png")
    assert Image.open(first).size == (720, 420)
    assert len(_red_columns(none)) == 0  # red is the chosen epoch's mark only
    assert np.median(_red_columns(first)) < 360 < np.median(_red_columns(last))
    assert draw_selection_curve([[0, float("nan")]], 0, "m", tmp_path / "d.png") is None


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit_lines(untrained: UntrainedEpoch, max_epochs: int, reworded: bool = True) -> list[str]:
    """Lightning's stop line in a real fit of ``max_epochs`` trained epochs."""
    lines = _Lines()
    logger = logging.getLogger("pytorch_lightning")
    logger.addHandler(lines)
    try:
        trainer = pl.Trainer(max_epochs=untrained.lightning_max_epochs(max_epochs), logger=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, accelerator="cpu")  # fmt: skip
        offset = untrained.offset if reworded else 0
        with epochs_as_trained(offset):
            trainer.fit(_Tiny(), DataLoader(TensorDataset(torch.ones(2, 1)), batch_size=2))
    finally:
        logger.removeHandler(lines)
    return [line for line in lines.lines if "stopped" in line]


def test_lightnings_stop_line_counts_trained_epochs():
    (line,) = _fit_lines(UntrainedEpoch(True), 2)  # Lightning runs 3 epochs: 0 trains nothing
    assert line.startswith("training stopped: trainer.max_epochs=2 reached (epochs 1-2 trained")
    assert "un-adapted" in line and "max_epochs=3" not in line
    (line,) = _fit_lines(UntrainedEpoch(False), 2)  # no untrained epoch: Lightning's own words
    assert line == "`Trainer.fit` stopped: `max_epochs=2` reached."
    # the check can fail: without the rewording, Lightning counts the untrained epoch too
    (line,) = _fit_lines(UntrainedEpoch(True), 2, reworded=False)
    assert line == "`Trainer.fit` stopped: `max_epochs=3` reached."
