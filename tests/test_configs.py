"""Every experiment and entry-point config composes, and keys map to constructor arguments;
settings that cannot be meant are refused before a run (config.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose
from hydra.utils import get_object
from omegaconf import OmegaConf

from cfa_lightning.config import CONFIG_DIR, ConfigError, check_train_config, unused_pixels

ROOT = Path(__file__).resolve().parents[1]
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
    for group in ("data", "model", "backbone", "trainer"):  # the model's: CFALitModule.from_config
        assert callable(get_object(cfg[group]["_target_"]))  # every target imports


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
    # the default features and bank, chosen on four development products (docs/training.md)
    assert list(cfg.backbone.out_indices) == [2, 3]
    assert cfg.model.bank.construction == "coreset" and cfg.model.bank.size == 16384
    paper_cfg = compose("train", overrides=["+experiment=wide_resnet50", "+protocol=paper"])
    assert list(paper_cfg.backbone.out_indices) == [1, 2, 3]  # the paper's taps and bank
    assert paper_cfg.model.bank.construction == "positional"


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


# ------------------------------------------------- settings that cannot be meant (config.py)


@pytest.mark.parametrize("epochs", [0, -1, -5, 2.5])
def test_max_epochs_of_zero_or_below_is_refused_in_one_line(hydra_ctx, epochs):
    cfg = compose("train", overrides=[f"trainer.max_epochs={epochs}"], return_hydra_config=True)
    with pytest.raises(ConfigError) as err:
        check_train_config(cfg)
    message = str(err.value)
    assert message.startswith(f"error: trainer.max_epochs={epochs} is not a number of epochs")
    assert "give 1 or more, e.g. trainer.max_epochs=30" in message and "\n" not in message


@pytest.mark.parametrize("epochs", ["null", "-1"])
def test_last_epoch_without_an_epoch_cap_is_refused(hydra_ctx, epochs):
    overrides = ["+protocol=last_epoch", f"trainer.max_epochs={epochs}"]
    cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with pytest.raises(ConfigError, match=f"trainer.max_epochs={epochs} sets no epoch cap, and "
                                          "protocol=last_epoch has no early stopping"):  # fmt: skip
        check_train_config(cfg)
    # a cap that ends the fit: the default's 30 epochs, or max_steps
    check_train_config(compose("train", overrides=["+protocol=last_epoch"]))
    capped = compose("train", overrides=[*overrides[:1], "trainer.max_epochs=null",
                                         "+trainer.max_steps=100"])  # fmt: skip
    check_train_config(capped)
    # the validated default: early stopping ends a fit without an epoch cap
    check_train_config(compose("train", overrides=["trainer.max_epochs=null"]))


def test_a_pixel_budget_that_a_fixed_size_ignores_is_named(hydra_ctx):
    def warning(*overrides: str) -> str | None:
        return unused_pixels(compose("train", overrides=list(overrides), return_hydra_config=True))

    message = warning("data.image_size=256", "data.pixels=102400")
    assert message.startswith("data.pixels=102400 has no effect: data.image_size=256 fixes the "
                              "model's input at 256 x 256 (65536 pixels)")  # fmt: skip
    assert "set data.image_size=auto" in message
    assert "data.image_size=128" in warning(
        "data=synthetic", "data.image_size=128", "data.pixels=65536"
    )
    assert warning("+experiment=wide_resnet50", "data.image_size=256") is None  # the group's own
    assert warning("data.image_size=[416,160]") is None  # a size of one's own, the budget untouched
    assert warning("data.image_size=auto", "data.pixels=102400") is None  # the budget is used
    assert warning("data.image_size=256", "data.pixels=65536") is None  # it agrees with the size


def test_the_train_command_refuses_an_uncapped_last_epoch_before_any_work(tmp_path):
    """ConfigCheck (conf/train.yaml's hydra.callbacks) runs before the job: one line, rc 1."""
    command = [sys.executable, "-m", "cfa_lightning.train", "+protocol=last_epoch",
               "trainer.max_epochs=-1", f"data.root={tmp_path / 'none'}",
               f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "error: trainer.max_epochs=-1 sets no epoch cap, and protocol=last_epoch has no early "
            "stopping: the fit would not end"
        )
    )
    assert not (tmp_path / "none").exists()  # no data was looked for, no download started


def test_fast_preset_only_shrinks_the_coreset(hydra_ctx):
    """+preset=fast changes the bank's size and nothing else."""
    base = compose("train", overrides=["+experiment=efficientnet_lite0"])
    fast = compose("train", overrides=["+experiment=efficientnet_lite0", "+preset=fast"])
    assert base.model.bank.construction == fast.model.bank.construction
    assert (base.model.bank.size, fast.model.bank.size) == (16384, 4096)
    fast.model.bank.size = base.model.bank.size
    assert fast == base
