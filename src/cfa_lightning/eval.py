"""Score a trained checkpoint on the test split: `python -m cfa_lightning.eval ckpt_path=...`."""

from __future__ import annotations

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from .checkpoint import exits_on_checkpoint_error
from .config import CONFIG_DIR, input_size
from .models.lit_module import CFALitModule
from .utils import (
    closing_loggers,
    format_table,
    instantiate_dict,
    log,
    output_dir,
    plain,
    write_metrics,
)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    pl.seed_everything(cfg.seed, workers=True)
    model = CFALitModule.from_checkpoint(cfg.ckpt_path)
    trained = list(model.model.input_size)
    asked = input_size(plain(cfg.data.image_size), plain(cfg.data.crop_size))
    if trained != asked:
        raise ValueError(
            f"{cfg.ckpt_path} was trained at input size {trained} but data.image_size/data.crop_size "
            f"give {asked}; set them to the training values"
        )
    datamodule = instantiate(cfg.data)
    loggers = instantiate_dict(cfg.get("logger"))
    with closing_loggers(loggers):
        trainer = instantiate(cfg.trainer, logger=loggers or False)
        trainer.test(model, datamodule=datamodule)
        metrics = dict(model.test_results)
        if trainer.is_global_zero:  # every rank holds the same gathered metrics; one writes
            path = write_metrics(
                output_dir() / "metrics.json",
                metrics,
                seed=cfg.seed,
                ckpt_path=str(cfg.ckpt_path),
                backbone=model.hparams.backbone["name"],
                category=cfg.data.category,
                image_size=plain(cfg.data.image_size),
                crop_size=plain(cfg.data.crop_size),
                input_size=trained,
            )
            title = f"CFA test metrics ({cfg.data.category}, {cfg.ckpt_path})"
            print(format_table(metrics, title))
            log.info("metrics written to %s", path)
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
@exits_on_checkpoint_error
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
