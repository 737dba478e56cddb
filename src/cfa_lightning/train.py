"""Train CFA, then test the last epoch's model: `python -m cfa_lightning.train +experiment=...`."""

from __future__ import annotations

import time

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from .config import CONFIG_DIR
from .utils import (
    closing_loggers,
    format_table,
    instantiate_dict,
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
        path = write_metrics(
            output_dir() / "metrics.json",
            metrics,
            seed=cfg.seed,
            backbone=cfg.backbone.name,
            category=cfg.data.category,
            image_size=plain(cfg.data.image_size),
            crop_size=plain(cfg.data.crop_size),
            input_size=plain(cfg.model.input_size),
            epochs=trainer.current_epoch,
            selection="last epoch",
            train_time_s=round(train_time, 2),
            gamma_c=cfg.model.gamma_c,
            gamma_d=cfg.model.gamma_d,
            radius_init=cfg.model.radius,
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


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
