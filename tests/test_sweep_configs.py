"""Sweep, DDP and W&B configs compose; names and groups resolve inside and outside sweeps."""

from pathlib import Path

import pytest
from hydra import compose
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cfa_lightning.config import CONFIG_DIR, SWEEP_GROUP_ENV

SWEEPS = sorted(p.stem for p in (Path(CONFIG_DIR) / "sweep").glob("*.yaml"))


def test_the_promised_sweeps_exist():
    assert {"categories", "ablation", "resolutions"} <= set(SWEEPS)


@pytest.mark.parametrize("sweep", SWEEPS)
def test_sweep_composes_and_names_its_folder(hydra_ctx, sweep):
    cfg = compose("train", overrides=["+experiment=wide_resnet50", f"+sweep={sweep}"],
                  return_hydra_config=True)  # fmt: skip
    assert cfg.hydra.sweeper.params, "a sweep config sets hydra.sweeper.params"
    assert f"_{sweep}/" in cfg.hydra.sweep.dir
    # folders: <job number>_<overrides except bookkeeping ones>_seed<seed>
    subdir = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["subdir"]
    assert subdir == "${hydra.job.num}_${hydra.job.override_dirname}_seed${seed}"
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


def test_resolution_sweep_covers_both_paper_settings(hydra_ctx):
    cfg = compose("train", overrides=["+sweep=resolutions"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params["data.crop_size"] == "null,224"
    assert str(cfg.hydra.sweeper.params["data.image_size"]) == "256"


def test_ddp_trainer_config(hydra_ctx):
    cfg = compose("train", overrides=["trainer=ddp"])
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 2


def test_wandb_names_and_groups_outside_a_sweep(hydra_ctx, monkeypatch):
    cfg = compose("train", overrides=["+experiment=demo", "logger=wandb", "seed=3"])
    monkeypatch.delenv(SWEEP_GROUP_ENV, raising=False)
    assert cfg.logger.wandb.name == "train_tf_efficientnet_lite0_synthetic_seed3"
    assert cfg.logger.wandb.group is None and list(cfg.logger.wandb.tags) == ["demo"]
    monkeypatch.setenv(SWEEP_GROUP_ENV, "train_categories_2026")  # set by gpu_sweep.py
    assert cfg.logger.wandb.group == "train_categories_2026"


def test_default_callbacks_instantiate_with_the_wandb_media(hydra_ctx):
    cfg = compose("train", overrides=["callbacks.model_checkpoint.dirpath=/tmp/x"])
    media = instantiate(cfg.callbacks.wandb_media)
    assert media.num_images == 8 and media.masks
