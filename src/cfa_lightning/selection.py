"""Model selection and sweep objectives that never look at the test set.

- ``model_selection: best_val`` (the validated default) tests the epoch with the best
  ``selection_metric`` on validation: Lightning's ``ModelCheckpoint(monitor=...)`` keeps it,
  ``EarlyStopping`` ends the fit, and ``trainer.test(ckpt_path="best")`` scores it once.
  ``SelectionCheck`` stops a run whose validation cannot produce the metric at the first
  validation, and records every validated epoch for ``metrics.json``.
- ``model_selection: last`` tests the last epoch's model (``+protocol=paper``).
- A ``test/...`` metric is never the value returned to a sweeper (``check_objective``).
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger

from .checkpoint import load_checkpoint
from .models.untrained_epoch import UntrainedEpoch

__all__ = [
    "MODEL_SELECTION",
    "SelectionCheck",
    "check_objective",
    "check_selection",
    "find_callback",
    "require_sweeper_plugin",
    "selection_record",
    "selects",
    "sweeper_target",
]

MODEL_SELECTION = ("best_val", "last")
BASIC_SWEEPER = "BasicSweeper"  # Hydra's grid sweeper: runs every job and chooses nothing


def sweeper_target() -> str | None:
    """``_target_`` of the Hydra sweeper of this run (None outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    sweeper = HydraConfig.get().get("sweeper")
    return None if sweeper is None else sweeper.get("_target_")


def selects(sweeper: str | None) -> bool:
    """Whether a sweeper chooses trials or a winner by the returned value: all but the basic one."""
    return bool(sweeper) and not str(sweeper).endswith(BASIC_SWEEPER)


def check_objective(metric: str | None, multirun: bool) -> None:
    """Refuse a ``test/...`` objective in any sweep, whatever the sweeper."""
    if multirun and metric and str(metric).startswith("test/"):
        raise ValueError(
            f"optimized_metric={metric}: a sweep never returns a test metric. A sweeper that "
            "selects would tune on the test set (its best trial's test score optimistically "
            "biased), and a grid's returned values invite the same choice by hand. Optimise a "
            "validation metric (optimized_metric=val/pixel_AUPRO with "
            "data.val_anomalies=synthetic, the default) and test the chosen configuration "
            "once (experiments/tune_then_test.py); every job's test metrics stay in its "
            "metrics.json."
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


def find_callback(callbacks: list[Any], kind: type) -> Any:
    """The first callback of a kind (None if there is none)."""
    return next((c for c in callbacks if isinstance(c, kind)), None)


def check_selection_callbacks(callbacks: list[Any], metric: str, mode: str) -> ModelCheckpoint:
    """``model_selection=best_val`` needs a ModelCheckpoint that keeps the best ``metric``."""
    checkpoint = find_callback(callbacks, ModelCheckpoint)
    if checkpoint is None or checkpoint.monitor != metric or checkpoint.save_top_k < 1:
        found = "none" if checkpoint is None else f"monitor={checkpoint.monitor!r}"
        raise ValueError(
            f"model_selection=best_val tests the best {metric} on validation, which needs "
            f"callbacks.model_checkpoint with monitor={metric} and save_top_k >= 1 "
            f"(conf/callbacks/selection.yaml; found {found}). Keep callbacks=default or "
            "callbacks=selection, or test the last epoch: +protocol=last_epoch."
        )
    if checkpoint.mode != mode:
        raise ValueError(
            f"selection_mode={mode} but callbacks.model_checkpoint.mode={checkpoint.mode}"
        )
    stopper = find_callback(callbacks, EarlyStopping)
    if stopper is not None and stopper.monitor != metric:
        raise ValueError(
            f"callbacks.early_stopping.monitor={stopper.monitor} but selection_metric={metric}: "
            "early stopping and the checkpoint it keeps must watch the same metric."
        )
    return checkpoint


class SelectionCheck(pl.Callback):
    """Fails fast when validation cannot select, and records every validated epoch.

    At the start of fit: no validation images at all stops the run (``data.val_fraction``). At
    the first validation: ``monitor`` not logged stops the run, naming the option that produces
    it, before any epoch is trained for nothing. ``history`` maps each validated epoch to its
    ``val/...`` scalars (kept in checkpoints, so a resumed fit keeps it). Under ``logger=wandb``
    the per-epoch curves end the fit as one W&B line plot, ``val/curves``.
    """

    CURVES = ("val/pixel_AUPRO", "val/pixel_AUROC", "val/image_AUROC")  # the W&B line plot

    def __init__(self, monitor: str = "val/pixel_AUPRO") -> None:
        super().__init__()
        self.monitor = monitor
        self.history: dict[int, dict[str, float]] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = trainer.datamodule
        loader = datamodule.val_dataloader() if datamodule is not None else None
        if trainer.limit_val_batches == 0 or (loader is not None and len(loader) == 0):
            self._no_validation()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A validation that was due this epoch and did not run: stop now, not after max_epochs.
        due = (trainer.current_epoch + 1) % (trainer.check_val_every_n_epoch or 1) == 0
        if due and trainer.current_epoch not in self.history:
            self._no_validation()

    def _no_validation(self) -> None:
        raise ValueError(
            f"model_selection=best_val selects on {self.monitor}, but this run has no "
            "validation images: keep data.val_fraction > 0 (default 0.1) or give a "
            "validation folder (data=folder data.val_dir=...), and keep "
            "trainer.limit_val_batches > 0; or test the last epoch: +protocol=paper."
        )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        logged = trainer.callback_metrics
        if self.monitor not in logged:
            available = sorted(k for k in logged if k.startswith("val/")) or ["(none)"]
            raise ValueError(
                f"selection_metric={self.monitor} was not logged by validation (logged: "
                f"{', '.join(available)}). Anomaly metrics need anomalies in the validation "
                "split: val/pixel_AUROC and val/pixel_AUPRO need masks, which the synthetic "
                "anomalies of data.val_anomalies=synthetic (the default) have; val/image_AUROC "
                "also comes from real defects in a data.val_dir with defect subfolders (they "
                "have no masks). Or set selection_metric to a logged metric "
                "(selection_mode=min for val/loss)."
            )
        self.history[trainer.current_epoch] = {
            k: float(v) for k, v in logged.items() if k.startswith("val/")
        }

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epochs = sorted(self.history)
        keys = [k for k in self.CURVES if epochs and all(k in self.history[e] for e in epochs)]
        for logger in trainer.loggers if keys and trainer.is_global_zero else []:
            if isinstance(logger, WandbLogger):
                import wandb

                ys = [[self.history[e][k] for e in epochs] for k in keys]
                plot = wandb.plot.line_series(
                    xs=epochs, ys=ys, keys=list(keys), title="validation per epoch", xname="epoch"
                )
                logger.experiment.log({"val/curves": plot})

    def state_dict(self) -> dict[str, Any]:
        return {"history": {int(e): dict(m) for e, m in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {int(e): dict(m) for e, m in state_dict.get("history", {}).items()}

    def metrics_at(self, epoch: int | None) -> dict[str, float]:
        """The validation scalars of a validated epoch ({} if it was not validated)."""
        return dict(self.history.get(epoch, {})) if epoch is not None else {}

    def curve(self) -> list[list[float]]:
        """``[epoch, value]`` of ``monitor`` for every validated epoch, in order."""
        return [
            [epoch, metrics[self.monitor]]
            for epoch, metrics in sorted(self.history.items())
            if self.monitor in metrics and math.isfinite(metrics[self.monitor])
        ]


def selection_record(
    trainer: pl.Trainer, rule: str, metric: str, mode: str, untrained: UntrainedEpoch
) -> tuple[dict[str, Any], dict[str, float], str | None]:
    """What a finished fit chose: metrics.json's ``selection`` record (with the chosen epoch's
    checkpoint file: the best one, or last.ckpt under ``last``), the chosen epoch's validation
    scalars, and the checkpoint to test ("best"; None: the weights in memory, i.e. the last
    epoch). Epochs count trained epochs."""
    stopped = untrained.trained(trainer.current_epoch - 1)  # the last epoch run
    val_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    selection: dict[str, Any] = {"rule": rule, "epoch": stopped, "stopped_epoch": stopped}
    checker = find_callback(trainer.callbacks, SelectionCheck)
    test_ckpt = None
    if rule == "best_val":
        checkpoint = find_callback(trainer.callbacks, ModelCheckpoint)
        stopper = find_callback(trainer.callbacks, EarlyStopping)
        if not checkpoint.best_model_path:
            raise RuntimeError(
                f"model_selection=best_val: no epoch had a finite {metric} on validation, so "
                "there is no best checkpoint; see the validation logs"
            )
        best = load_checkpoint(checkpoint.best_model_path)["epoch"]  # Lightning's index
        best_score = float(checkpoint.best_model_score)
        val_metrics = checker.metrics_at(best) if checker else {metric: best_score}
        selection.update(
            metric=metric,
            mode=mode,
            epoch=untrained.trained(best),
            value=best_score,
            checkpoint=str(checkpoint.best_model_path),
            early_stopped=bool(stopper is not None and stopper.stopped_epoch > 0),
            patience=stopper.patience if stopper is not None else None,
        )
        test_ckpt = "best"  # the epoch chosen on validation; the test set is used once
    else:  # the weights in memory; last.ckpt (a checkpoint without monitor) holds them
        checkpoints = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
        saved = [c.best_model_path for c in checkpoints if c.monitor is None and c.best_model_path]
        selection["checkpoint"] = saved[0] if saved else None
    if checker is not None:
        selection["val_curve"] = [[untrained.trained(e), v] for e, v in checker.curve()]
    return selection, val_metrics, test_ckpt
