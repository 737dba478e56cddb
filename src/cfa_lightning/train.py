"""Train CFA, select the epoch on validation, test it once: `python -m cfa_lightning.train`.

The validated protocol (the default): epoch 0 validates the un-adapted phi and trains nothing,
epochs 1..``trainer.max_epochs`` train; ``EarlyStopping`` ends the fit, ``ModelCheckpoint``
keeps the best ``selection_metric`` and ``trainer.test(ckpt_path="best")`` scores it. Epoch k
in logs, checkpoint names and ``metrics.json`` is the model after k training epochs.
``+protocol=paper``: all of train/good, 30 epochs, the last one tested, no validation.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only

from . import report
from .checkpoint import exits_on_checkpoint_error, load_checkpoint
from .config import CONFIG_DIR, is_multirun
from .models.backbone import WeightsUnavailable
from .models.untrained_epoch import UntrainedEpoch
from .precision import check_precision
from .selection import (
    SelectionCheck,
    check_objective,
    check_selection,
    check_selection_callbacks,
    require_sweeper_plugin,
    selection_record,
    selects,
    sweeper_target,
)
from .sizes import (
    check_input_size,
    is_auto,
    largest_tap_stride,
    model_input_size,
    smallest_side,
)
from .utils import (
    closing_loggers,
    instantiate_dict,
    job_info,
    log,
    output_dir,
    plain,
    write_metrics,
)


def tests_after_fit(cfg: DictConfig) -> bool:
    """``test_after_fit``; unset (null): test, except in a sweep whose sweeper selects."""
    value = cfg.get("test_after_fit")
    if value is None:
        return not (is_multirun() and selects(sweeper_target()))
    return bool(value)


def continue_in_resumed_folder(resumed: dict[str, Any], callbacks: list) -> None:
    """Resuming: checkpoints go on in the interrupted fit's folder. ModelCheckpoint then restores
    its best score and path (from another folder it would forget the score, and keep a worse
    epoch as the best), and last.ckpt goes on beside it."""
    for key, state in (resumed.get("callbacks") or {}).items():
        if key.startswith("ModelCheckpoint") and isinstance(state, dict) and state.get("dirpath"):
            folder = str(state["dirpath"])
            if Path(folder).is_dir():
                for saver in callbacks:
                    if isinstance(saver, ModelCheckpoint):
                        saver.dirpath = folder
                log.info("resuming: checkpoints continue in %s", folder)
            return


def build_trainer(
    cfg: DictConfig, callbacks: list, loggers: list, untrained: UntrainedEpoch, **kw
) -> pl.Trainer:
    """The configured Trainer; ``trainer.max_epochs`` counts trained epochs."""
    kw.setdefault("max_epochs", untrained.lightning_max_epochs(cfg.trainer.get("max_epochs")))
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **kw)


def fix_input_size(cfg: DictConfig, datamodule: Any) -> None:
    """The model's input (H, W), fixed and checked before the model is built: under
    ``data.image_size=auto`` the datamodule measures the training images (model.input_size, the
    checkpoint and metrics.json follow); any size, forced, auto or cropped, must leave each side
    what the taps, the map's blur and the synthetic defects need (sizes.smallest_side)."""
    stride = largest_tap_stride(cfg.backbone.name, cfg.backbone.out_indices)
    side = smallest_side(stride, float(cfg.model.blur_sigma))
    if is_auto(cfg.data.get("image_size")):
        datamodule.prepare_data()  # the images must be there to be measured (a download is locked)
        cfg.data.image_size = list(datamodule.choose_image_size(stride, cfg.backbone.name, side))
    crop = cfg.data.get("crop_size")  # the model's input when set, else the resize
    option = "data.crop_size" if crop is not None else "data.image_size"
    value = plain(crop if crop is not None else cfg.data.image_size)
    check_input_size(model_input_size(cfg.data.image_size, crop), option, value, side)


def refit(
    cfg: DictConfig, epochs: int, loggers: list, test: bool
) -> tuple[pl.LightningModule, float]:
    """Retrain on all of train/good for ``epochs`` epochs (same seed, bank from all images).

    The refit model has no held-out images, so no validation and no calibrated thresholds;
    its checkpoint is ``checkpoints/refit.ckpt``. Returns the model (tested once if ``test``)
    and the fit's wall time.
    """
    pl.seed_everything(cfg.seed, workers=True)  # the same phi init as the selected run
    datamodule = instantiate(cfg.data, val_fraction=0.0, val_anomalies="none")
    model = instantiate(cfg.model, untrained_epoch=False)
    others = [
        c
        for c in instantiate_dict(cfg.get("callbacks"))
        if not isinstance(c, SelectionCheck | EarlyStopping | ModelCheckpoint)
    ]  # progress bar and test media
    no_validation = {"limit_val_batches": 0, "enable_checkpointing": False}
    trainer = build_trainer(cfg, others, [], model.untrained, max_epochs=epochs, **no_validation)
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, weights_only=True)
    fit_time = time.perf_counter() - start
    trainer.save_checkpoint(output_dir() / "checkpoints" / "refit.ckpt")
    if test:  # a fresh trainer: the test metrics go to the run's loggers
        tester = build_trainer(cfg, others, loggers, model.untrained)
        tester.test(model, datamodule=datamodule)
    return model, fit_time


def write_record(
    cfg: DictConfig,
    trainer: pl.Trainer,
    model: Any,
    datamodule: Any,
    metrics: dict[str, float],
    selection: dict[str, Any],
    val_metrics: dict[str, float],
    tested: bool,
    timings: dict[str, float | None],
) -> None:
    """metrics.json (the test metrics and how they were obtained), the selection curve and the
    run's summary."""
    refitted = timings["refit_time_s"] is not None
    path = write_metrics(
        output_dir() / "metrics.json",
        metrics,
        **job_info(cfg),
        status="ok",
        protocol=cfg.get("protocol"),
        input_size=plain(cfg.model.input_size),
        auto_size=datamodule.auto_size,  # how data.image_size=auto chose it, or None
        epochs=selection["stopped_epoch"],
        selection=selection,
        val_metrics=val_metrics,
        tested=tested,
        refit=refitted,
        **timings,
        world_size=trainer.world_size,
        radius_final=float(model.model.loss_fn.radius.detach()),
        bank_centres=model.model.bank.n_centres,
        bank_build_s=round(model.bank_build_s, 2),
    )
    # the chosen epoch and why, its checkpoint, the test metrics, the run folder; the curve PNG
    metric = cfg.get("selection_metric", "val/pixel_AUPRO")
    epochs = cfg.trainer.get("max_epochs")
    report.finish(selection, metrics, path.parent, metric, epochs, refitted, log)


def train(cfg: DictConfig) -> dict[str, float]:
    check_precision(cfg.trainer)  # bf16 on a GPU without it: one line naming trainer.precision
    # resume: a missing, truncated or unsafe file stops here, in one line
    resumed = load_checkpoint(cfg.ckpt_path) if cfg.get("ckpt_path") else None
    rule = check_selection(cfg.get("model_selection", "best_val"))
    metric, mode = cfg.get("selection_metric", "val/pixel_AUPRO"), cfg.get("selection_mode", "max")
    test = tests_after_fit(cfg)
    pl.seed_everything(cfg.seed, workers=True)  # phi's init, and so the bank, depend on the seed
    datamodule = instantiate(cfg.data)
    fix_input_size(cfg, datamodule)  # auto: from the training images, before the model
    model = instantiate(cfg.model, untrained_epoch=bool(cfg.get("validate_untrained", False)))
    loggers = instantiate_dict(cfg.get("logger"))
    with closing_loggers(loggers):
        callbacks = instantiate_dict(cfg.get("callbacks"))
        if rule == "best_val":
            check_selection_callbacks(callbacks, metric, mode)
        if resumed is not None:
            continue_in_resumed_folder(resumed, callbacks)
        trainer = build_trainer(cfg, callbacks, loggers, model.untrained)
        for logger in loggers:
            logger.log_hyperparams(plain(cfg))
        start = time.perf_counter()
        with report.epochs_as_trained(model.untrained.offset):  # Lightning's stop line
            trainer.fit(
                model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True
            )
        timings = {"train_time_s": round(time.perf_counter() - start, 2), "refit_time_s": None}
        selection, val_metrics, test_ckpt = selection_record(
            trainer, rule, metric, mode, model.untrained
        )
        if cfg.get("refit", False):
            model, refit_time = refit(cfg, selection["epoch"], loggers, test)
            timings["refit_time_s"] = round(refit_time, 2)
        elif test:
            trainer.test(model, datamodule=datamodule, ckpt_path=test_ckpt, weights_only=True)
        metrics = dict(model.test_results) if test else {}
        if trainer.is_global_zero:  # every rank holds the same gathered metrics; one writes
            write_record(
                cfg, trainer, model, datamodule, metrics, selection, val_metrics, test, timings
            )
    return {**val_metrics, **metrics}  # "val/..." and "test/..." keys


def unwrapped(err: Exception) -> Exception:
    """The error itself, without Hydra's InstantiationException wrappers (their message is the
    repr of the error they wrap, once per level of the config)."""
    while isinstance(err, InstantiationException) and isinstance(err.__cause__, Exception):
        err = err.__cause__
    return err


def record_failure(cfg: DictConfig, err: BaseException) -> None:
    """A failed job still leaves a metrics.json (status "failed", the error) for the sweep's table."""
    if rank_zero_only.rank != 0:
        return
    try:
        info = job_info(cfg)
    except Exception:  # the config itself may be what failed
        info = {}
    path = write_metrics(
        output_dir() / "metrics.json",
        {},
        **info,
        status="failed",
        error=f"{type(err).__name__}: {err}",
    )
    log.error("job failed (%s: %s); status written to %s", type(err).__name__, err, path)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@exits_on_checkpoint_error
def _hydra_main(cfg: DictConfig) -> Any:
    objective = cfg.get("optimized_metric")
    sweeper = sweeper_target()
    check_objective(objective, is_multirun())  # before any work: never tune on the test set
    try:
        metrics = train(cfg)
    except Exception as wrapped:
        err = unwrapped(wrapped)
        record_failure(cfg, err)
        if isinstance(err, WeightsUnavailable) and not is_multirun():
            raise SystemExit(f"error: {err}") from None  # the offline routes, in one line
        # Optuna records a trial that raises as failed and goes on (+sweep=tune sets
        # max_failure_rate); a NaN it cannot record, and its sweep stops on its own error.
        if not is_multirun() or selects(sweeper):
            raise
        # In a sweep, one failing job must not stop the others: report it and go on.
        log.exception("sweep job failed; the sweep goes on")
        return math.nan
    if objective and objective not in metrics and is_multirun():
        missing = (
            f"optimized_metric={objective} was not computed in this job (validation metrics "
            "need data.val_anomalies=synthetic or a validation folder with anomalies)"
        )
        if selects(sweeper):
            raise ValueError(f"{missing}; the sweeper has nothing to select by")
        log.warning("%s; returning NaN", missing)
    return metrics.get(objective, math.nan)


def main() -> Any:
    require_sweeper_plugin(sys.argv[1:])  # before Hydra: its own error would not name the extra
    return _hydra_main()


if __name__ == "__main__":
    main()
