"""Tests for selection.py: best_val picks the right epoch; test metrics are no sweep objective."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from cfa_lightning.selection import (
    BestValCheckpoint,
    check_objective,
    check_selection,
    require_sweeper_plugin,
)

sys.path.insert(0, str(Path(__file__).parent))
from test_commands import run  # noqa: E402

OPTUNA = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
BASIC = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


class Scripted(pl.LightningModule):
    """Logs a scripted validation metric per epoch; the weight records the epoch it was saved at."""

    def __init__(self, values: list[float]):
        super().__init__()
        self.values = values
        self.epoch_seen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self):
        self.epoch_seen.fill_(self.current_epoch)
        value = self.values[self.current_epoch]
        if value is not None:  # None: the metric is undefined this epoch
            self.log("val/pixel_AUPRO", value)

    def configure_optimizers(self):
        return torch.optim.SGD(self.layer.parameters(), lr=0.0)


def _fit(values, tmp_path, mode="max", every=1):
    loader = DataLoader(TensorDataset(torch.ones(2, 1)), batch_size=2)
    selector = BestValCheckpoint(tmp_path, "val/pixel_AUPRO", mode)
    trainer = pl.Trainer(max_epochs=len(values), callbacks=[selector], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, check_val_every_n_epoch=every,
                         num_sanity_val_steps=0, accelerator="cpu")  # fmt: skip
    trainer.fit(Scripted(values), loader, loader)
    return selector


@pytest.mark.parametrize(
    "values, mode, best",
    [
        ([0.50, 0.72, 0.60, 0.72, 0.65], "max", 1),  # a tie keeps the earlier epoch
        ([0.50, 0.40, 0.45, 0.30, 0.35], "min", 3),
        ([0.50, None, 0.90, None, 0.10], "max", 2),  # epochs without the metric are skipped
    ],
)
def test_best_val_picks_the_right_epoch(values, mode, best, tmp_path):
    selector = _fit(values, tmp_path, mode)
    assert selector.best_epoch == best and selector.best_value == pytest.approx(values[best])
    saved = torch.load(selector.best_path, weights_only=False)
    assert saved["epoch"] == best and float(saved["state_dict"]["epoch_seen"]) == best
    assert selector.summary() == {"rule": "best_val", "metric": "val/pixel_AUPRO", "mode": mode,
                                  "epoch": best, "value": pytest.approx(values[best])}  # fmt: skip


def test_best_val_with_validation_every_other_epoch(tmp_path):
    selector = _fit([0.9, 0.1, 0.2, 0.5], tmp_path, every=2)  # validates after epochs 1 and 3
    assert [epoch for epoch, _ in selector.history] == [1, 3] and selector.best_epoch == 3


def test_a_test_metric_is_refused_as_the_objective_of_a_selecting_sweeper():
    with pytest.raises(ValueError, match="would tune on the test set"):
        check_objective("test/image_AUROC", OPTUNA)
    check_objective("test/image_AUROC", BASIC)  # the basic sweeper only reports
    check_objective("test/image_AUROC", None)  # a single run
    check_objective("val/pixel_AUPRO", OPTUNA)
    with pytest.raises(ValueError, match="last, best_val"):
        check_selection("best_test")


def test_missing_optuna_plugin_names_the_extra(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match=r"pip install -e '.\[optuna\]'"):
        require_sweeper_plugin(["-m", "+sweep=tune", "data.category=screw"])
    require_sweeper_plugin(["-m", "+sweep=categories"])  # other sweeps need no plugin


def test_optuna_sweep_refuses_a_test_objective(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = run("cfa_lightning.train", "-m", "+experiment=demo", "+sweep=tune",
               "optimized_metric=test/image_AUROC", "hydra.sweeper.n_trials=1",
               f"data.root={tmp_path / 'data'}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
               check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "would tune on the test set" in proc.stderr + proc.stdout
    assert not (tmp_path / "data").exists()  # refused before any work
