"""Sweep, DDP and W&B configs compose; names and groups resolve inside and outside sweeps."""

from pathlib import Path

import pytest
from hydra import compose
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cfa_lightning.config import CONFIG_DIR

SWEEPS = sorted(p.stem for p in (Path(CONFIG_DIR) / "sweep").glob("*.yaml"))


def test_the_promised_sweeps_exist():
    assert {"categories", "ablation", "resolutions"} <= set(SWEEPS)


@pytest.mark.parametrize("sweep", SWEEPS)
def test_sweep_composes_and_names_its_folder(hydra_ctx, sweep):
    if sweep.startswith("tune"):
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose("train", overrides=["+experiment=wide_resnet50", f"+sweep={sweep}"],
                  return_hydra_config=True)  # fmt: skip
    assert cfg.hydra.sweeper.params, "a sweep config sets hydra.sweeper.params"
    assert f"_{sweep}/" in cfg.hydra.sweep.dir
    # folders: <job number>_<overrides except bookkeeping ones>_seed<seed>; a tuning trial's
    # values would make too long a name: <job number>_trial, the values are in trials.csv
    subdir = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["subdir"]
    if sweep.startswith("tune"):
        assert subdir == "${hydra.job.num}_trial"
    else:
        assert (
            subdir
            == "${hydra.job.num}_${cfa_folder_name:${hydra.job.override_dirname}}_seed${seed}"
        )
    assert {"sweep", "seed", "logger", "data.root"} <= set(
        cfg.hydra.job.config.override_dirname.exclude_keys
    )


def test_every_ablation_job_composes(hydra_ctx):
    cfg = compose("train", overrides=["+sweep=ablation"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    for backbone in params.backbone.split(","):
        job = compose("train", overrides=[f"backbone={backbone}", "model.gamma_c=16"])
        model = OmegaConf.to_container(job.model, resolve=True)
        assert model["backbone"]["name"] == job.backbone.name and model["gamma_c"] == 16


def test_resolution_sweep_sweeps_the_pixel_budget(hydra_ctx):
    cfg = compose("train", overrides=["+sweep=resolutions"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params["data.image_size"] == "auto" and "data.crop_size" not in params
    budgets = [int(p) for p in params["data.pixels"].split(",")]
    assert 256 * 256 in budgets and len(budgets) > 1
    for pixels in budgets:  # every job composes with its budget
        job = compose("train", overrides=["data.image_size=auto", f"data.pixels={pixels}"])
        assert job.data.pixels == pixels


def test_ddp_trainer_config(hydra_ctx):
    cfg = compose("train", overrides=["trainer=ddp"])
    assert cfg.trainer.devices == 2
    assert cfg.trainer.strategy._target_ == "pytorch_lightning.strategies.DDPStrategy"
    assert cfg.trainer.strategy.broadcast_buffers is False  # no buffer copies before each step


def test_wandb_names_and_groups_outside_a_sweep(hydra_ctx):
    cfg = compose("train", overrides=["+experiment=demo", "logger=wandb", "seed=3"])
    assert cfg.logger.wandb.name == "train_tf_efficientnet_lite0_synthetic_seed3"
    assert cfg.logger.wandb.group is None and list(cfg.logger.wandb.tags) == ["demo"]


def test_default_callbacks_instantiate_with_the_wandb_media(hydra_ctx):
    cfg = compose("train", overrides=["callbacks.model_checkpoint.dirpath=/tmp/x"])
    media = instantiate(cfg.callbacks.wandb_media)
    assert media.num_images == 8 and media.masks


def test_tune_sweep_optimises_validation_with_a_seeded_tpe(hydra_ctx):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose("train", overrides=["+experiment=efficientnet_lite0", "+sweep=tune"],
                  return_hydra_config=True)  # fmt: skip
    sweeper = cfg.hydra.sweeper
    assert "optuna" in sweeper._target_.lower() and sweeper.direction == "maximize"
    assert sweeper.sampler._target_.endswith("TPESampler") and sweeper.sampler.seed == 0
    assert cfg.optimized_metric.startswith("val/") and cfg.data.val_anomalies == "synthetic"
    searched = set(sweeper.params)
    assert {"model.radius", "model.K", "model.J", "model.alpha", "model.blur_sigma",
            "backbone.out_indices", "data.image_size", "model.gamma_c", "model.gamma_d",
            "trainer.max_epochs"} <= searched  # fmt: skip
    assert "tune_report" in cfg.hydra.callbacks


def test_paper_protocol_trains_on_all_of_train_good(hydra_ctx):
    cfg = compose("train", overrides=["+experiment=wide_resnet50", "+protocol=paper"])
    assert cfg.data.val_fraction == 0 and cfg.model_selection == "last"
    validated = compose("train", overrides=["+experiment=wide_resnet50"])
    assert validated.data.val_fraction == 0.1 and validated.model_selection == "best_val"
    assert cfg.data.split_seed == 0  # fixed: the training seed varies the initialisation only
    assert compose("train", overrides=["seed=5"]).data.split_seed == 0
