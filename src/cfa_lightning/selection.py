"""Model selection and sweep objectives that never look at the test set.

- ``model_selection: last`` tests the last epoch's model (the paper's protocol);
  ``best_val`` tests the checkpoint with the best ``selection_metric`` on validation.
- The value returned to a sweeper (``optimized_metric``) may be a ``test/...`` metric only for
  sweepers that do not select (Hydra's basic sweeper just reports it); a sweeper that selects,
  such as Optuna, would tune on the test set, so such a run is refused.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info

__all__ = [
    "MODEL_SELECTION",
    "BestValCheckpoint",
    "check_objective",
    "require_sweeper_plugin",
    "selects",
    "sweeper_target",
]

MODEL_SELECTION = ("last", "best_val")
# Sweepers that choose the next trials or a winner from the returned value.
SELECTING_SWEEPERS = ("optuna", "nevergrad", "ax")


def sweeper_target() -> str | None:
    """``_target_`` of the Hydra sweeper of this run (None outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    sweeper = HydraConfig.get().get("sweeper")
    return None if sweeper is None else sweeper.get("_target_")


def selects(sweeper: str | None) -> bool:
    """Whether a sweeper (its ``_target_``) chooses trials or a winner by the returned value."""
    return bool(sweeper) and any(name in sweeper.lower() for name in SELECTING_SWEEPERS)


def check_objective(metric: str | None, sweeper: str | None) -> None:
    """Refuse a test-set objective under a sweeper that selects on it."""
    if not metric or not str(metric).startswith("test/") or not sweeper:
        return
    if selects(sweeper):
        raise ValueError(
            f"optimized_metric={metric} with the sweeper {sweeper}: that sweeper selects "
            "hyper-parameters by the value it gets back, so it would tune on the test set and "
            "its best trial's test score would be optimistically biased. Optimise a validation "
            "metric instead (optimized_metric=val/pixel_AUPRO with data.val_anomalies=synthetic, "
            "as +sweep=tune does) and test the chosen configuration once "
            "(experiments/tune_then_test.py). Hydra's basic sweeper may still report test metrics."
        )


def require_sweeper_plugin(argv: list[str]) -> None:
    """A tuning sweep without the Optuna plugin stops with the extra to install."""
    import importlib.util
    import re

    wants_optuna = any(re.search(r"(^|\+)sweep=tune|hydra/sweeper=optuna", a) for a in argv)
    if wants_optuna and importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:
        raise SystemExit(
            "the Optuna sweeper plugin is not installed; +sweep=tune needs it: "
            "pip install -e '.[optuna]' (hydra-optuna-sweeper with optuna<3, sqlalchemy<2 and "
            "alembic<1.14, pinned so that it leaves hydra-core as it is)"
        )


def check_selection(rule: str) -> str:
    if rule not in MODEL_SELECTION:
        raise ValueError(f"model_selection={rule!r}; choose one of {', '.join(MODEL_SELECTION)}")
    return rule


class BestValCheckpoint(pl.Callback):
    """Saves ``<dirpath>/best.ckpt`` whenever ``monitor`` improves on validation.

    Records the chosen epoch, its value and all validation metrics of that epoch
    (``best_epoch``, ``best_value``, ``best_metrics``). Ties keep the earlier epoch. An epoch
    without the metric (no validation run, or the metric undefined) is skipped.
    """

    def __init__(self, dirpath: str | Path, monitor: str = "val/pixel_AUPRO", mode: str = "max"):
        super().__init__()
        if mode not in ("max", "min"):
            raise ValueError(f"selection_mode={mode!r}; choose max or min")
        self.dirpath = Path(dirpath)
        self.monitor = monitor
        self.mode = mode
        self.best_epoch: int | None = None
        self.best_value: float | None = None
        self.best_metrics: dict[str, float] = {}
        self.history: list[tuple[int, float]] = []

    @property
    def best_path(self) -> Path:
        return self.dirpath / "best.ckpt"

    def _better(self, value: float) -> bool:
        if self.best_value is None:
            return True
        return value > self.best_value if self.mode == "max" else value < self.best_value

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None or not math.isfinite(float(value)):
            return
        value = float(value)
        epoch = trainer.current_epoch
        self.history.append((epoch, value))
        if self._better(value):
            self.best_epoch, self.best_value = epoch, value
            self.best_metrics = {
                k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")
            }
            trainer.save_checkpoint(self.best_path)  # every rank calls it; rank 0 writes
            rank_zero_info(f"best {self.monitor} so far: {value:.4f} at epoch {epoch}")

    def summary(self) -> dict[str, Any]:
        """What metrics.json records about the selection."""
        return {
            "rule": "best_val",
            "metric": self.monitor,
            "mode": self.mode,
            "epoch": self.best_epoch,
            "value": self.best_value,
        }
