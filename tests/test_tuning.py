"""Tests for tuning.py and the Optuna sweep (+sweep=tune): the trial table, best command, proxy."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest

from cfa_lightning.tuning import best_command, spearman

sys.path.insert(0, str(Path(__file__).parent))
from test_commands import SMALL, run  # noqa: E402


def test_spearman_matches_known_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties take their mean rank: ranks x = 1, 2.5, 2.5, 4 against y = 1, 2, 3, 4
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)
    assert math.isnan(spearman([1, 2, 3], [5, 5, 5]))  # a constant column has no ranking
    assert math.isnan(spearman([1, float("nan"), 3], [1, 2, 3]))  # fewer than 3 pairs


def test_best_command_keeps_the_sweep_settings_and_adds_the_best_values():
    command = best_command(
        ["+experiment=demo", "+sweep=tune", "data.category=screw", "model.K=3",
         "hydra.sweeper.n_trials=4"],
        {"model.K": 5, "backbone.out_indices": [2, 3], "model.radius": 1e-4},
    )  # fmt: skip
    assert command == (
        "python -m cfa_lightning.train +experiment=demo data.category=screw model.K=5 "
        "'backbone.out_indices=[2,3]' model.radius=0.0001"
    )


def _tune_demo(tmp_path: Path, *overrides: str) -> tuple[Path, list[dict[str, str]]]:
    """A 2-trial +sweep=tune study on the demo data: its folder and its trials.csv rows."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    small = [o for o in SMALL if not o.startswith("trainer.max_epochs")]
    run("cfa_lightning.train", "-m", "+experiment=demo", "+sweep=tune", f"data.root={tmp_path / 'data'}",
        *small, "data.val_fraction=0.34", "trainer.max_epochs=1", "model.gamma_c=4",
        "hydra.sweeper.n_trials=2", "logger=csv", "callbacks=none", f"hydra.sweep.dir={sweep}",
        *overrides)  # fmt: skip
    with (sweep / "trials.csv").open() as f:
        return sweep, list(csv.DictReader(f))


@pytest.mark.slow
def test_two_trial_optuna_sweep_on_the_demo(tmp_path):
    sweep, trials = _tune_demo(tmp_path, f"hydra.sweeper.storage=sqlite:///{tmp_path / 'study.db'}")
    assert len(trials) == 2 and all(t["status"] == "ok" for t in trials)
    assert all(0.0 <= float(t["objective"]) <= 1.0 for t in trials)
    assert all(t["objective"] == t["val/pixel_AUPRO"] for t in trials)  # validation, not test
    best = json.loads((sweep / "best.json").read_text())
    assert best["objective"] == "val/pixel_AUPRO" and best["n_trials"] == 2
    assert best["best_value"] == max(float(t["objective"]) for t in trials)
    command = (sweep / "best_command.txt").read_text()
    assert command.startswith("python -m cfa_lightning.train +experiment=demo")
    assert "sweep=tune" not in command and f"model.K={best['best_params']['model.K']}" in command
    assert (tmp_path / "study.db").is_file()  # the study is stored: a second sweep resumes it


@pytest.mark.slow
def test_a_failing_trial_is_recorded_and_the_optuna_study_goes_on(tmp_path):
    # Tap 9 does not exist in resnet18: that trial raises, Optuna records it as failed (a NaN
    # would have stopped the study with an unrelated "Values were told" error). The seeded TPE
    # draws both values in the 2 trials.
    sweep, rows = _tune_demo(tmp_path, "backbone.out_indices=choice([2,3],[1,2,9])")
    trials = {t["param:backbone.out_indices"]: t for t in rows}
    assert trials["[1,2,9]"]["status"] == "failed" and trials["[2,3]"]["status"] == "ok"
    best = json.loads((sweep / "best.json").read_text())
    assert best["best_params"]["backbone.out_indices"] == "[2,3]"  # as the plugin stores it
    status = json.loads((sweep / "sweep_status.json").read_text())
    assert status["n_failed"] == 1
