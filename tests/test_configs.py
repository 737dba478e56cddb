"""Every experiment and entry-point config composes, and keys map to constructor arguments."""

from pathlib import Path

import pytest
from hydra import compose
from hydra.utils import get_class
from omegaconf import OmegaConf

from cfa_lightning.config import CONFIG_DIR

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))


def test_the_design_card_experiments_exist():
    assert {"wide_resnet50", "resnet18", "efficientnet_lite0", "demo"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(hydra_ctx, experiment):
    cfg = compose("train", overrides=[f"+experiment={experiment}"])
    model = OmegaConf.to_container(cfg.model, resolve=True)
    assert model["backbone"]["name"] == cfg.backbone.name
    size = cfg.data.crop_size or cfg.data.image_size
    if size == "auto":  # chosen from the training images when training starts
        assert model["input_size"] == "auto" and cfg.data.pixels > 0
    else:
        assert model["input_size"] == ([size, size] if isinstance(size, int) else list(size))
    for group in ("data", "model", "backbone", "trainer"):
        get_class(cfg[group]["_target_"])  # every target imports


def test_paper_defaults(hydra_ctx):
    cfg = compose("train", overrides=["+experiment=wide_resnet50"])
    assert cfg.model.K == 1  # the validated default's; the paper's protocol restores 3
    assert compose("train", overrides=["+experiment=wide_resnet50", "+protocol=paper"]).model.K == 3
    paper = {"J": 3, "alpha": 0.1, "nu": 1e-3, "radius": 1e-5, "gamma_c": 1, "gamma_d": 1,
             "learn_radius": True, "lr": 1e-3, "weight_decay": 5e-4, "amsgrad": True}  # fmt: skip
    assert {k: cfg.model[k] for k in paper} == paper
    assert cfg.trainer.max_epochs == 30 and cfg.data.batch_size == 4
    assert cfg.data.image_size == "auto" and cfg.data.pixels == 256 * 256  # the default rule
    assert cfg.backbone.name.startswith("wide_resnet50_2")


def test_crop_sets_the_model_input_size(hydra_ctx):
    cfg = compose("train", overrides=["+experiment=resnet18", "data.crop_size=224"])
    assert OmegaConf.to_container(cfg.model, resolve=True)["input_size"] == [224, 224]


def test_eval_config_composes(hydra_ctx):
    cfg = compose("eval", overrides=["ckpt_path=x.ckpt", "data=synthetic"])
    assert cfg.ckpt_path == "x.ckpt" and cfg.data.category == "synthetic"


def test_auto_size_with_a_crop_is_the_crop(hydra_ctx):
    cfg = compose("train", overrides=["data.image_size=auto", "data.crop_size=224"])
    assert cfg.data.image_size == "auto"
    assert OmegaConf.to_container(cfg.model, resolve=True)["input_size"] == [224, 224]


def test_eval_reads_the_sizes_from_the_checkpoint(hydra_ctx, trained_checkpoint):
    cfg = compose("eval", overrides=[f"ckpt_path={trained_checkpoint}"])
    assert list(cfg.data.image_size) == [64, 80] and cfg.data.crop_size is None
    given = compose("eval", overrides=[f"ckpt_path={trained_checkpoint}", "data.image_size=96"])
    assert given.data.image_size == 96  # a size on the command line still wins
