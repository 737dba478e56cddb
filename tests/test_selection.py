"""Tests for selection.py and the validated protocol: the best validated epoch is tested, early
stopping ends the fit, bad input stops at the first validation, and no test metric is an objective.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose
from hydra.utils import instantiate
from torch.utils.data import DataLoader, TensorDataset

from cfa_lightning import train as train_module
from cfa_lightning.selection import (
    check_objective,
    check_selection,
    check_selection_callbacks,
    require_sweeper_plugin,
    selects,
)

sys.path.insert(0, str(Path(__file__).parent))
from test_commands import SMALL, run  # noqa: E402

OPTUNA = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
BASIC = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


class Scripted(pl.LightningModule):
    """Logs a scripted validation metric per epoch; the weight records the epoch it was saved at."""

    def __init__(self, values: list[float | None], name: str = "val/pixel_AUPRO"):
        super().__init__()
        self.values, self.name = values, name
        self.epoch_seen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self):
        self.epoch_seen.fill_(self.current_epoch)
        self.log("val/loss", 1.0)
        value = self.values[self.current_epoch]
        if value is not None:
            self.log(self.name, value)

    def configure_optimizers(self):
        return torch.optim.SGD(self.layer.parameters(), lr=0.0)


def _selection_callbacks(tmp_path, *overrides):
    """The three selection callbacks exactly as conf/callbacks/selection.yaml builds them."""
    cfg = compose("train", overrides=[f"callbacks.model_checkpoint.dirpath={tmp_path}", *overrides])
    return [instantiate(cfg.callbacks[k]) for k in ("selection_check", "model_checkpoint",
                                                     "early_stopping")]  # fmt: skip


def _fit(values, callbacks, val=True, name="val/pixel_AUPRO"):
    loader = DataLoader(TensorDataset(torch.ones(2, 1)), batch_size=2)
    trainer = pl.Trainer(max_epochs=len(values), callbacks=callbacks, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, accelerator="cpu")  # fmt: skip
    model = Scripted(values, name)
    trainer.fit(model, loader, loader if val else [])
    return trainer, model


@pytest.mark.parametrize(
    "values, mode, best, stop",
    [
        ([0.50, 0.72, 0.60, 0.72, 0.65, 0.70, 0.71, 0.69], "max", 1, 4),  # a tie keeps epoch 1
        ([0.50, 0.40, 0.45, 0.30, 0.35, 0.36, 0.29, 0.38], "min", 6, 7),  # the cap ends it
    ],
)
def test_the_best_epoch_is_kept_and_early_stopping_ends_the_fit(
    hydra_ctx, tmp_path, values, mode, best, stop
):
    check, ckpt, stopper = _selection_callbacks(tmp_path, f"selection_mode={mode}")
    assert stopper.patience == 3 and ckpt.save_top_k == 1 and ckpt.monitor == check.monitor
    trainer, _ = _fit(values, [check, ckpt, stopper])
    assert trainer.current_epoch - 1 == stop  # the last epoch that ran
    saved = torch.load(ckpt.best_model_path, weights_only=True)
    assert saved["epoch"] == best and float(saved["state_dict"]["epoch_seen"]) == best
    assert float(ckpt.best_model_score) == pytest.approx(values[best])
    assert check.curve() == [[e, pytest.approx(v)] for e, v in enumerate(values[: stop + 1])]
    assert check.metrics_at(best)["val/pixel_AUPRO"] == pytest.approx(values[best])


class ScriptedMetric(pl.Callback):
    """Logs a scripted val/scripted at each validation of a real fit."""

    def __init__(self, values: list[float]) -> None:
        self.values = values

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            pl_module.log("val/scripted", self.values[trainer.current_epoch])


def test_epoch_0_can_win_and_its_checkpoint_is_the_untrained_model(
    hydra_ctx, tmp_path, synthetic_root
):
    """The real untrained epoch of CFALitModule (its step, its optimiser hook), selected."""
    from cfa_lightning.data import MVTecDataModule
    from tiny_models import tiny_module

    check, ckpt, stopper = _selection_callbacks(
        tmp_path, "selection_metric=val/scripted", "callbacks.early_stopping.patience=1"
    )
    pl.seed_everything(0)
    dm = MVTecDataModule(str(synthetic_root), "synthetic", image_size=(64, 80), batch_size=4,
                         val_fraction=0.34, val_anomalies="none")  # fmt: skip
    module = tiny_module(untrained_epoch=True)
    start = {k: v.clone() for k, v in module.state_dict().items() if "descriptor" in k}
    start["model.loss_fn.radius"] = module.model.loss_fn.radius.detach().clone()
    trainer = pl.Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[ScriptedMetric([0.9, 0.1, 0.2, 0.3]), check, ckpt, stopper])  # fmt: skip
    trainer.fit(module, datamodule=dm)
    assert trainer.current_epoch - 1 == 1  # epoch 1 is worse; patience 1 stops there
    saved = torch.load(ckpt.best_model_path, weights_only=True)
    assert saved["epoch"] == 0 and float(ckpt.best_model_score) == pytest.approx(0.9)
    # the selected checkpoint holds phi and r exactly as initialised: epoch 0 trained nothing
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in start.items())
    assert not all(torch.equal(module.state_dict()[k], v) for k, v in start.items())  # epoch 1


def test_a_metric_validation_never_logs_stops_at_the_first_validation(hydra_ctx, tmp_path):
    callbacks = _selection_callbacks(tmp_path)
    with pytest.raises(ValueError, match="selection_metric=val/pixel_AUPRO was not logged") as err:
        _fit([None] * 30, callbacks)
    assert "data.val_anomalies=synthetic" in str(err.value) and "val/loss" in str(err.value)
    assert callbacks[0].history == {} and not list(tmp_path.glob("*.ckpt"))  # nothing saved


def test_no_validation_images_stop_the_run_at_once(hydra_ctx, tmp_path):
    with pytest.raises(ValueError, match="no validation images: keep data.val_fraction > 0"):
        _fit([0.5] * 30, _selection_callbacks(tmp_path), val=False)


def test_best_val_needs_a_checkpoint_that_monitors_the_metric(hydra_ctx, tmp_path):
    with pytest.raises(ValueError, match=r"callbacks.model_checkpoint .* found none"):
        check_selection_callbacks([], "val/pixel_AUPRO", "max")
    check, ckpt, stopper = _selection_callbacks(
        tmp_path, "callbacks.early_stopping.monitor=val/loss"
    )
    with pytest.raises(ValueError, match="must watch the same metric"):
        check_selection_callbacks([check, ckpt, stopper], "val/pixel_AUPRO", "max")
    with pytest.raises(ValueError, match="best_val, last"):
        check_selection("best_test")


def test_protocols_in_the_config(hydra_ctx):
    default = compose("train", overrides=["+experiment=wide_resnet50"])
    assert (default.protocol, default.model_selection, default.validate_untrained) == (
        "validated", "best_val", True)  # fmt: skip
    assert default.data.val_anomalies == "synthetic" and default.data.val_fraction == 0.1
    paper = compose("train", overrides=["+experiment=wide_resnet50", "+protocol=paper"])
    assert (paper.protocol, paper.model_selection, paper.validate_untrained) == (
        "paper", "last", False)  # fmt: skip
    assert paper.data.val_fraction == 0 and paper.trainer.max_epochs == 30
    assert paper.trainer.limit_val_batches == 0 and paper.callbacks.early_stopping is None
    assert paper.callbacks.model_checkpoint is None  # nothing selected; last.ckpt is tested
    assert paper.callbacks.last_checkpoint.monitor is None
    for experiment in ("efficientnet_lite0", "resnet18", "demo"):
        cfg = compose("train", overrides=[f"+experiment={experiment}"])
        assert cfg.protocol == "validated" and cfg.data.val_anomalies == "synthetic"
    folder = compose("train", overrides=["+experiment=resnet18", "data=folder"])
    assert folder.data.val_anomalies == "synthetic" and folder.model_selection == "best_val"


def test_untrained_epoch_trains_nothing_and_validates(synthetic_root):
    from cfa_lightning.data import MVTecDataModule
    from tiny_models import tiny_module

    pl.seed_everything(0)
    dm = MVTecDataModule(str(synthetic_root), "synthetic", image_size=(64, 80), batch_size=4,
                         val_fraction=0.34, val_anomalies="synthetic")  # fmt: skip
    module = tiny_module(untrained_epoch=True)
    start = {k: v.clone() for k, v in module.state_dict().items() if "descriptor" in k}
    radius = module.model.loss_fn.radius.detach().clone()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    assert start and all(torch.equal(module.state_dict()[k], v) for k, v in start.items())
    assert torch.equal(module.model.loss_fn.radius.detach(), radius)
    assert bool(module.model.bank.fitted) and "val/pixel_AUPRO" in trainer.callback_metrics
    trainer.fit_loop.max_epochs = 2  # epoch 1 trains
    trainer.fit(module, datamodule=dm)
    assert any(not torch.equal(module.state_dict()[k], v) for k, v in start.items())


def test_a_test_metric_is_refused_as_the_objective_of_every_sweep():
    with pytest.raises(ValueError, match="a sweep never returns a test metric"):
        check_objective("test/image_AUROC", multirun=True)  # whatever the sweeper
    check_objective("test/image_AUROC", multirun=False)  # a single run returns it to nobody
    check_objective("val/pixel_AUPRO", multirun=True)
    assert selects(OPTUNA) and selects("my.own.Sweeper") and not selects(BASIC)
    assert not selects(None)


@pytest.mark.parametrize(
    "value, multirun, sweeper, expected",
    [
        (None, False, BASIC, True),  # a single run tests
        (None, True, BASIC, True),  # a grid tests every job
        (None, True, OPTUNA, False),  # Optuna trials never see the test set ...
        (True, True, OPTUNA, True),  # ... unless asked (the proxy study)
        (False, False, None, False),
    ],
)
def test_test_after_fit(monkeypatch, value, multirun, sweeper, expected):
    from omegaconf import OmegaConf

    monkeypatch.setattr(train_module, "is_multirun", lambda: multirun)
    monkeypatch.setattr(train_module, "sweeper_target", lambda: sweeper)
    assert train_module.tests_after_fit(OmegaConf.create({"test_after_fit": value})) is expected


def test_missing_optuna_plugin_names_the_extra(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match=r"pip install -e '.\[optuna\]'"):
        require_sweeper_plugin(["-m", "+sweep=tune", "data.category=screw"])
    require_sweeper_plugin(["-m", "+sweep=categories"])  # other sweeps need no plugin


@pytest.mark.parametrize("sweep", [["+sweep=tune", "hydra.sweeper.n_trials=1"], []])
def test_sweeps_refuse_a_test_objective(tmp_path, sweep):
    if sweep:
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = run("cfa_lightning.train", "-m", "+experiment=demo", *sweep, "seed=0,1",
               "optimized_metric=test/image_AUROC", f"data.root={tmp_path / 'data'}",
               f"hydra.sweep.dir={tmp_path / 'sweep'}", check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "a sweep never returns a test metric" in proc.stderr + proc.stdout
    assert not (tmp_path / "data").exists()  # refused before any work


# ---- the train command ------------------------------------------------------------------------


def _train(tmp_path, name, *overrides, check=True):
    out = tmp_path / name
    given = {o.split("=")[0] for o in overrides}
    small = [o for o in SMALL if o.split("=")[0] not in given]  # the test's own values win
    proc = run("cfa_lightning.train", "+experiment=demo", f"data.root={tmp_path / 'data'}", *small,
               "logger=none", "callbacks=selection", f"hydra.run.dir={out}", *overrides,
               check=check)  # fmt: skip
    result = (
        json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else None
    )
    return proc, result


def test_bad_selection_input_stops_at_the_first_validation(tmp_path):
    proc, result = _train(tmp_path, "metric", "selection_metric=val/pixel_AUPR", check=False)
    assert proc.returncode != 0 and result["status"] == "failed"
    assert "selection_metric=val/pixel_AUPR was not logged by validation" in proc.stderr
    assert not (tmp_path / "metric" / "checkpoints").exists()  # not one epoch trained
    proc, result = _train(tmp_path, "none", "data.val_anomalies=none", check=False)
    assert "selection_metric=val/pixel_AUPRO was not logged" in proc.stderr
    assert "data.val_anomalies=synthetic" in proc.stderr
    proc, result = _train(tmp_path, "few", "data.val_fraction=0.1", check=False)
    assert "set data.val_fraction=0.3 or more" in proc.stderr  # 12 images: 0.3 holds out 4


@pytest.mark.slow  # 30-55 s on 2 cores: keeps `make test` under 10 minutes
def test_resume_mid_run_keeps_the_selection(tmp_path):
    """Interrupted after epoch 1 (of 0..3), resumed from last.ckpt in a new run folder."""
    _, first = _train(tmp_path, "first", "trainer.max_epochs=1")
    assert first["epochs"] == 1 and len(first["selection"]["val_curve"]) == 2
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    proc, resumed = _train(tmp_path, "resumed", "trainer.max_epochs=3", f"ckpt_path={ckpt}")
    assert "memory bank restored from the checkpoint" in proc.stderr
    sel = resumed["selection"]
    assert resumed["epochs"] == 3 and [e for e, _ in sel["val_curve"]] == [0, 1, 2, 3]
    assert sel["val_curve"][:2] == first["selection"]["val_curve"]  # history kept
    curve = dict((int(e), v) for e, v in sel["val_curve"])
    assert sel["epoch"] == max(curve, key=lambda e: (curve[e], -e))
    # the checkpoints continue in the first run's folder, so the best score was not forgotten
    assert Path(sel["checkpoint"]).parent == tmp_path / "first" / "checkpoints"


def test_paper_protocol_and_refit(tmp_path):
    # +protocol=paper sets data.val_fraction=0, which SMALL's value would override on the CLI
    proc, paper = _train(tmp_path, "paper", "+protocol=paper", "data.val_fraction=0",
                         "trainer.max_epochs=1")  # fmt: skip
    assert paper["protocol"] == "paper" and paper["selection"]["rule"] == "last"
    assert paper["epochs"] == 1 and paper["val_metrics"] == {}
    last = tmp_path / "paper" / "checkpoints" / "last.ckpt"  # the model tested, in the summary
    assert paper["selection"]["checkpoint"] == str(last) and f"checkpoint  {last}\n" in proc.stdout
    assert (
        "memory bank (positional) built from 12 training images" in proc.stderr
    )  # all of train/good, the paper's bank
    proc, refit = _train(tmp_path, "refit", "refit=true", "callbacks.early_stopping.patience=1")
    chosen = refit["selection"]["epoch"]
    assert refit["refit"] and refit["metrics"]["test/image_AUROC"] > 0.5
    assert "memory bank (coreset) built from 8 training images" in proc.stderr  # the selection run
    assert "memory bank (coreset) built from 12 training images" in proc.stderr  # the refit
    saved = torch.load(tmp_path / "refit" / "checkpoints" / "refit.ckpt", weights_only=True)
    assert saved["epoch"] == chosen  # retrained for the chosen number of epochs
    assert "Restoring states" not in proc.stderr  # the refit model is tested, not the selected one
    assert f"checkpoint  {tmp_path / 'refit' / 'checkpoints' / 'refit.ckpt'}\n" in proc.stdout
