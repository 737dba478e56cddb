"""Train CFA, then test the last epoch's model: `python -m cfa_lightning.train +experiment=...`."""

from __future__ import annotations

import math
import time
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only

from .config import CONFIG_DIR, is_multirun
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
    pl.seed_everything(cfg.seed, workers=True)  # phi's init, and so the bank, depend on the seed
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    loggers = instantiate_dict(cfg.get("logger"))
    with closing_loggers(loggers):
        trainer = instantiate(
            cfg.trainer, callbacks=instantiate_dict(cfg.get("callbacks")), logger=loggers or False
        )
        for logger in loggers:
            logger.log_hyperparams(plain(cfg))
        start = time.perf_counter()
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        train_time = time.perf_counter() - start
        trainer.test(model, datamodule=datamodule)  # the weights of the last epoch, no selection
        metrics = dict(model.test_results)
        if trainer.is_global_zero:  # every rank holds the same gathered metrics; one writes
            path = write_metrics(
                output_dir() / "metrics.json",
                metrics,
                **job_info(cfg),
                status="ok",
                input_size=plain(cfg.model.input_size),
                epochs=trainer.current_epoch,
                selection="last epoch",
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
    return metrics


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
def main(cfg: DictConfig) -> Any:
    try:
        metrics = train(cfg)
    except Exception as err:
        record_failure(cfg, err)
        if not is_multirun():
            raise
        # In a sweep, one failing job must not stop the others: report it and go on.
        log.exception("sweep job failed; the sweep goes on")
        return math.nan
    return metrics.get(cfg.get("optimized_metric"), math.nan)


if __name__ == "__main__":
    main()
