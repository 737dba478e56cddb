"""What a training run tells its user at the end: which epoch was chosen and why, where its
checkpoint is, the test metrics and the run folder; and the selection curve as a PNG.

Epochs count trained epochs everywhere the user reads (epoch 0: the un-adapted model), so
Lightning's own stop line, which counts the untrained epoch too, is reworded during the fit.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from .visualize import font

CURVE_FILE = "selection_curve.png"
# Lightning's fit loop says this once max_epochs is reached (pytorch_lightning.loops.fit_loop).
_LIGHTNING_STOP = re.compile(r"`Trainer\.fit` stopped: `max_epochs=(\d+)` reached\.")
_LIGHTNING_LOGGERS = (
    "pytorch_lightning.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
)


class _TrainedEpochs(logging.Filter):
    """Rewrites Lightning's "`max_epochs=N` reached" into trained epochs (N - offset)."""

    def __init__(self, offset: int) -> None:
        super().__init__()
        self.offset = offset

    def filter(self, record: logging.LogRecord) -> bool:
        match = _LIGHTNING_STOP.fullmatch(record.getMessage())
        if match and self.offset:
            trained = int(match.group(1)) - self.offset
            record.msg = (
                f"training stopped: trainer.max_epochs={trained} reached (epochs 1-{trained} "
                "trained; epoch 0 validated the un-adapted model)"
            )
            record.args = ()
        return True


@contextmanager
def epochs_as_trained(offset: int) -> Iterator[None]:
    """During a fit with ``offset`` untrained epochs (``UntrainedEpoch.offset``), Lightning's stop
    line gives ``trainer.max_epochs`` as configured, not Lightning's max_epochs (one more)."""
    rewording = _TrainedEpochs(offset)
    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    for logger in loggers:
        logger.addFilter(rewording)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(rewording)


def chosen_lines(selection: dict[str, Any], max_epochs: int | None, refit: bool) -> list[str]:
    """Three lines of the summary: the epoch tested, why it was chosen, how training ended."""
    epoch, stopped = selection["epoch"], selection["stopped_epoch"]
    chosen = f"epoch {epoch}"
    if epoch == 0:
        chosen += ", the un-adapted model (epoch 0 trains nothing)"
    if refit:
        chosen += f"; retrained on all of train/good for {epoch} epoch(s) (refit=true)"
    if selection["rule"] == "best_val":
        first = min((int(e) for e, _ in selection.get("val_curve") or []), default=0)
        why = (
            f"the best {selection['metric']} on validation, {selection['value']:.4f}, of epochs "
            f"{first}-{stopped}" + (": no training epoch improved on it" if epoch == 0 else "")
        )
    else:
        why = f"the last epoch (model_selection={selection['rule']})"
    patience = f"{selection.get('patience')} validated epoch(s) without improvement"
    if max_epochs is not None and stopped == max_epochs:
        ended = f"at trainer.max_epochs={max_epochs} (epochs 1-{stopped} trained)"
        if selection.get("early_stopped"):  # the patience ran out at the cap: both are true
            ended += f", where early stopping's patience also ran out ({patience})"
    elif selection.get("early_stopped"):
        ended = f"early, after epoch {stopped}: {patience} (callbacks.early_stopping.patience)"
    else:
        ended = f"after epoch {stopped} (trainer.max_epochs={max_epochs})"
    return [f"  chosen      {chosen}", f"  why         {why}", f"  stopped     {ended}"]


def train_summary(
    selection: dict[str, Any],
    metrics: dict[str, float],
    run_dir: Path,
    checkpoint: str | None,
    curve: Path | None,
    max_epochs: int | None,
    refit: bool = False,
) -> str:
    """The few lines that end ``train``: what was tested, from which file, how well, and where."""
    tested = [k for k in sorted(metrics) if not k.endswith("_threshold")]  # those: metrics.json
    scores = ", ".join(f"{k} {metrics[k]:.4f}" for k in tested) or "not run (test_after_fit)"
    lines = [
        "run summary",
        *chosen_lines(selection, max_epochs, refit),
        f"  checkpoint  {checkpoint or 'none saved (no checkpoint callback)'}",
        f"  test        {scores}",
        f"  curve       {curve or 'none (no validation curve in this protocol)'}",
        f"  run folder  {run_dir} (metrics.json, checkpoints/, logs)",
    ]
    return "\n".join(lines)


def draw_selection_curve(
    curve: list[list[float]],
    chosen: int | None,
    metric: str,
    path: Path,
    size: tuple[int, int] = (720, 420),
) -> Path | None:
    """``metric`` on validation per epoch as a PNG, the chosen epoch marked in red; None (no
    file) without a finite point. ``curve`` is ``[[epoch, value], ...]``."""
    points = [(int(e), float(v)) for e, v in curve if math.isfinite(float(v))]
    if not points:
        return None
    width, height = size
    left, right, top, bottom = 70, 20, 40, 50  # margins: y labels, title, x labels
    inset = 16  # no point on the frame
    epochs = [e for e, _ in points]
    values = [v for _, v in points]
    lo, hi = min(values), max(values)
    pad = max((hi - lo) * 0.1, 1e-3)
    lo, hi = lo - pad, hi + pad
    e0, e1 = min(epochs), max(max(epochs), min(epochs) + 1)

    def xy(epoch: float, value: float) -> tuple[float, float]:
        x = left + inset + (epoch - e0) / (e1 - e0) * (width - left - right - 2 * inset)
        y = top + (hi - value) / (hi - lo) * (height - top - bottom)
        return x, y

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    big, small = font(15), font(12)
    title = f"{metric} on validation per epoch" + (" (epoch 0: un-adapted)" if 0 in epochs else "")
    draw.text((left, 10), title, "black", big)
    draw.rectangle([left, top, width - right, height - bottom], outline=(160, 160, 160))
    for i in range(5):  # y grid and labels
        value = lo + (hi - lo) * i / 4
        _, y = xy(e0, value)
        draw.line([left, y, width - right, y], fill=(230, 230, 230))
        draw.text((6, y - 7), f"{value:.3f}", "black", small)
    step = max(1, math.ceil((e1 - e0 + 1) / 15))  # at most ~15 x labels
    for epoch in range(e0, e1 + 1, step):
        x, _ = xy(epoch, lo)
        draw.line([x, height - bottom, x, height - bottom + 4], fill="black")
        draw.text((x - 4, height - bottom + 6), str(epoch), "black", small)
    draw.text((left + (width - left - right) // 2 - 20, height - 22), "epoch", "black", small)
    draw.line([xy(e, v) for e, v in points], fill=(40, 90, 200), width=2)
    for e, v in points:
        x, y = xy(e, v)
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(40, 90, 200))
    if chosen is not None and chosen in epochs:
        x, y = xy(chosen, values[epochs.index(chosen)])
        for y0 in range(top, height - bottom, 8):  # a dashed vertical line
            draw.line([x, y0, x, min(y0 + 4, height - bottom)], fill=(220, 0, 0))
        draw.ellipse([x - 7, y - 7, x + 7, y + 7], outline=(220, 0, 0), width=3)
        label = f"chosen: epoch {chosen}" + (" (un-adapted)" if chosen == 0 else "")
        label_x = x + 10 if x + 10 + draw.textlength(label, small) < width - right else x - 10
        anchor = "la" if label_x > x else "ra"
        draw.text((label_x, top + 4), label, (220, 0, 0), small, anchor=anchor)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def finish(
    selection: dict[str, Any],
    metrics: dict[str, float],
    run_dir: Path,
    metric: str,
    max_epochs: int | None,
    refit: bool,
    log: logging.Logger,
) -> Path | None:
    """End of ``train`` (rank 0): the curve of ``metric`` as a PNG in the run folder, then the
    summary in the log. Returns the PNG's path (None without a validation curve)."""
    points = selection.get("val_curve") or []
    curve = draw_selection_curve(points, selection["epoch"], metric, run_dir / CURVE_FILE)
    checkpoint = selection.get("checkpoint")
    if refit:  # the refit model is the one tested
        checkpoint = str(run_dir / "checkpoints" / "refit.ckpt")
    log.info("%s", train_summary(selection, metrics, run_dir, checkpoint, curve, max_epochs, refit))
    return curve
