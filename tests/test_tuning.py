"""Tests for tuning.py and the Optuna sweep (+sweep=tune): the trial table, best command, proxy."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from cfa_lightning.tuning import best_command, read_trials, write_table
from cfa_lightning.utils import write_metrics

sys.path.insert(0, str(Path(__file__).parent))
from test_commands import SMALL, run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location(
    "tune_then_test", ROOT / "experiments" / "tune_then_test.py"
)
tune_then_test = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tune_then_test)


def _trial(sweep: Path, job: str, aupro: float | None, test_aupro: float, status="ok") -> None:
    val = {} if aupro is None else {"val/pixel_AUPRO": aupro, "val/loss": 1.0}
    write_metrics(sweep / job / "metrics.json", {"test/pixel_AUPRO": test_aupro},
                  status=status, overrides=[f"model.K={job[0]}", "hydra.x=1"], val_metrics=val)  # fmt: skip


def test_trial_table_and_proxy_from_metrics_files(tmp_path):
    sweep = tmp_path / "sweep"
    # val objective 0.3, 0.1, 0.2, 0.4; test 0.7, 0.5, 0.9, 0.8; trial 10 failed (no values)
    for job, val, test in [("0_trial", 0.3, 0.7), ("1_trial", 0.1, 0.5), ("2_trial", 0.2, 0.9),
                           ("3_trial", 0.4, 0.8)]:  # fmt: skip
        _trial(sweep, job, val, test)
    _trial(sweep, "10_trial", None, math.nan, status="failed")
    (sweep / "4_trial").mkdir()  # died before writing its metrics.json: no row
    rows = read_trials(sweep, "val/pixel_AUPRO")
    assert [r["job"] for r in rows] == ["0_trial", "1_trial", "2_trial", "3_trial", "10_trial"]
    assert [r["param:model.K"] for r in rows] == ["0", "1", "2", "3", "1"]
    assert all("param:hydra.x" not in r for r in rows)
    assert [r["objective"] for r in rows[:4]] == [0.3, 0.1, 0.2, 0.4]
    assert math.isnan(rows[4]["objective"]) and rows[4]["status"] == "failed"
    write_table(rows, sweep / "trials.csv")
    proxy = tune_then_test.proxy_quality(sweep, "val/pixel_AUPRO")
    # ranks of val 3, 1, 2, 4 against test 2, 1, 4, 3 (by hand): sum d^2 = 6, rho = 1 - 6*6/60
    assert proxy["n_trials"] == 4 and proxy["spearman"]["test/pixel_AUPRO"] == pytest.approx(0.4)
    assert math.isnan(proxy["spearman"]["test/image_AUROC"])  # never computed: NaN, not 0


def test_sweep_status_reads_the_same_files_in_job_order(tmp_path):
    from cfa_lightning.callbacks import sweep_status

    sweep = tmp_path / "sweep"
    _trial(sweep, "10_trial", 0.2, 0.5)
    _trial(sweep, "2_trial", None, math.nan, status="failed")
    write_metrics(sweep / "2_trial" / "metrics.json", {}, status="failed", error="RuntimeError: x")
    (sweep / "3_trial").mkdir()  # died outside Python
    (sweep / ".submitit").mkdir()  # a launcher's own folder is not a job
    status = sweep_status(sweep)
    assert list(status["jobs"]) == ["2_trial", "3_trial", "10_trial"]  # by job number
    assert status["jobs"] == {"2_trial": "failed", "3_trial": "missing", "10_trial": "ok"}
    assert status["failed"] == ["2_trial", "3_trial"] and status["errors"] == {
        "2_trial": "RuntimeError: x"
    }


def test_rank_correlation_drops_non_finite_pairs_and_needs_three():
    rho = tune_then_test.rank_correlation
    assert rho([1, 2, float("nan"), 3, 4], [1, 3, 0, 2, 4]) == pytest.approx(0.8)
    assert math.isnan(rho([1, float("nan"), 3], [1, 2, 3]))  # fewer than 3 pairs
    assert math.isnan(rho([1, 2, 3], [5, 5, 5]))  # a constant column has no ranking


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
        "hydra.sweeper.n_trials=2", "logger=csv", "callbacks=selection", f"hydra.sweep.dir={sweep}",
        *overrides)  # fmt: skip
    with (sweep / "trials.csv").open() as f:
        return sweep, list(csv.DictReader(f))


@pytest.mark.slow
def test_two_trial_optuna_sweep_on_the_demo(tmp_path):
    sweep, trials = _tune_demo(tmp_path, f"hydra.sweeper.storage=sqlite:///{tmp_path / 'study.db'}")
    assert len(trials) == 2 and all(t["status"] == "ok" for t in trials)
    assert all(0.0 <= float(t["objective"]) <= 1.0 for t in trials)
    # The objective of each trial as Optuna was told it (train.py's return value, through the
    # sweeper), and as the trial's Lightning CSV log recorded val/pixel_AUPRO on validation.
    optuna = pytest.importorskip("optuna")
    study = optuna.load_study(study_name="cfa_tune", storage=f"sqlite:///{tmp_path / 'study.db'}")
    told = {trial.number: trial.value for trial in study.trials}
    for t in trials:
        number = int(t["job"].split("_", 1)[0])
        assert float(t["objective"]) == pytest.approx(told[number], rel=1e-9)
        (log_file,) = (sweep / t["job"] / "csv").glob("version_*/metrics.csv")
        with log_file.open() as f:
            logged = [
                float(r["val/pixel_AUPRO"]) for r in csv.DictReader(f) if r.get("val/pixel_AUPRO")
            ]
        assert logged and any(float(t["objective"]) == pytest.approx(v, rel=1e-6) for v in logged)
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
