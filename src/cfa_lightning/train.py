"""Train CFA, then test the last epoch's (or the best validated) model: `python -m cfa_lightning.train`."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only

from .checkpoint import exits_on_checkpoint_error, load_checkpoint
from .config import CONFIG_DIR, is_multirun
from .selection import (
    BestValCheckpoint,
    check_objective,
    check_selection,
    require_sweeper_plugin,
    selects,
    sweeper_target,
)
from .utils import (
    closing_loggers,
    format_table,
    instantiate_dict,
    job_info,
    log,
    output_dir,
    plain,
    write_metrics,
)


def train(cfg: DictConfig) -> dict[str, float]:
    if cfg.get("ckpt_path"):  # resume: a missing, truncated or unsafe file stops here, in one line
        load_checkpoint(cfg.ckpt_path)
    rule = check_selection(cfg.get("model_selection", "last"))
    pl.seed_everything(cfg.seed, workers=True)  # phi's init, and so the bank, depend on the seed
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    loggers = instantiate_dict(cfg.get("logger"))
    with closing_loggers(loggers):
        callbacks = instantiate_dict(cfg.get("callbacks"))
        selector = None
        if rule == "best_val":  # keep the checkpoint with the best validation metric
            selector = BestValCheckpoint(
                output_dir() / "checkpoints",
                cfg.get("selection_metric", "val/pixel_AUPRO"),
                cfg.get("selection_mode", "max"),
            )
            callbacks.append(selector)
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
        for logger in loggers:
            logger.log_hyperparams(plain(cfg))
        start = time.perf_counter()
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
        train_time = time.perf_counter() - start
        val_metrics = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")
        }  # of the last validated epoch
        selection: dict[str, Any] = {"rule": "last", "epoch": trainer.current_epoch - 1}
        if selector is None:
            trainer.test(model, datamodule=datamodule)  # the last epoch's weights
        elif selector.best_epoch is None:
            raise RuntimeError(
                f"model_selection=best_val: {selector.monitor} was never logged on validation; "
                "set data.val_anomalies=synthetic (or a validation folder with anomalies), or "
                "choose another selection_metric"
            )
        else:  # the epoch chosen on validation; the test set is used once, here
            trainer.test(model, datamodule=datamodule, ckpt_path=selector.best_path)
            val_metrics, selection = selector.best_metrics, selector.summary()
        selection["val_metric"] = cfg.get("selection_metric")
        selection["val_value"] = val_metrics.get(cfg.get("selection_metric", ""))
        metrics = dict(model.test_results)
        if trainer.is_global_zero:  # every rank holds the same gathered metrics; one writes
            path = write_metrics(
                output_dir() / "metrics.json",
                metrics,
                **job_info(cfg),
                status="ok",
                input_size=plain(cfg.model.input_size),
                epochs=trainer.current_epoch,
                selection=selection,
                val_metrics=val_metrics,
                train_time_s=round(train_time, 2),
                world_size=trainer.world_size,
                radius_final=float(model.model.loss_fn.radius.detach()),
            )
            print(
                format_table(
                    metrics,
                    f"CFA test metrics ({cfg.data.category}, {cfg.backbone.name}, seed {cfg.seed})",
                )
            )
            log.info("metrics written to %s", path)
    return {**val_metrics, **metrics}  # "val/..." and "test/..." keys


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
    check_objective(objective, sweeper)  # before any work: never tune on the test set
    try:
        metrics = train(cfg)
    except Exception as err:
        record_failure(cfg, err)
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
