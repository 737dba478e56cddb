"""A real multirun of the demo with W&B offline: a failing job, shared groups, media read back."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_commands import SMALL, run  # noqa: E402
from wandb_files import OfflineRun  # noqa: E402


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two jobs: n_train=12 trains; n_train=0 fails inside fit, after its W&B run has started."""
    tmp = tmp_path_factory.mktemp("sweep")
    proc = run("cfa_lightning.train", "-m", "+experiment=demo", f"data.root={tmp / 'data'}",
               *[o for o in SMALL if not o.startswith("data.n_train")], "data.n_train=12,0",
               "data.n_test_defect=5", "callbacks.wandb_media.num_images=3", "logger=wandb",
               f"hydra.sweep.dir={tmp / 'sweep'}", env={"WANDB_API_KEY": ""})  # fmt: skip
    return tmp / "sweep", proc


def _job(sweep_dir: Path, n_train: int) -> Path:
    (job,) = [p for p in sweep_dir.iterdir() if f"data.n_train={n_train}," in p.name]
    return job


def test_a_failing_job_is_reported_and_the_sweep_goes_on(sweep):
    sweep_dir, proc = sweep
    assert proc.returncode == 0
    ok = json.loads((_job(sweep_dir, 12) / "metrics.json").read_text())
    failed = json.loads((_job(sweep_dir, 0) / "metrics.json").read_text())
    assert ok["status"] == "ok" and ok["metrics"]["test/image_AUROC"] > 0.5
    assert failed["status"] == "failed" and failed["error"] and failed["metrics"] == {}
    assert "data.n_train=0" in failed["overrides"]
    status = json.loads((sweep_dir / "sweep_status.json").read_text())
    assert status["n_jobs"] == 2 and status["failed"] == [_job(sweep_dir, 0).name]
    assert "1 of 2 sweep jobs failed" in proc.stderr + proc.stdout


def test_one_wandb_run_per_job_named_by_its_values_in_one_group(sweep):
    sweep_dir, _ = sweep
    runs = {
        n: OfflineRun(next((_job(sweep_dir, n) / "wandb").glob("offline-run-*"))) for n in (12, 0)
    }
    assert runs[12].group == runs[0].group == f"{sweep_dir.parent.name}_sweep"
    for n, wandb_run in runs.items():
        assert wandb_run.name == _job(sweep_dir, n).name and f"data.n_train={n}" in wandb_run.name
    assert runs[12].exit_code == 0 and runs[0].exit_code == 1  # closed, and marked failed
    config = runs[12].config["data"]
    config = config.get("value", config)
    assert config["n_train"] == 12 and config["category"] == "synthetic"  # the resolved config


def test_wandb_summary_media_table_and_histogram(sweep):
    sweep_dir, _ = sweep
    wandb_run = OfflineRun(next((_job(sweep_dir, 12) / "wandb").glob("offline-run-*")))
    metrics = json.loads((_job(sweep_dir, 12) / "metrics.json").read_text())["metrics"]
    for key, value in metrics.items():
        assert wandb_run.summary[key] == pytest.approx(value, rel=1e-6), key
    assert set(wandb_run.summary["val/loss"]) == {"min"}  # best value as the summary
    assert wandb_run.metric_summaries["val/loss"].min
    # 3 overlays (fixed sample) with ground-truth and predicted masks, toggled in the W&B UI
    assert wandb_run.summary["test/overlays/count"] == 3
    assert len([p for p in wandb_run.media("overlays_*.png") if ".mask." not in p.name]) == 3
    masks = wandb_run.summary["test/overlays/all_masks"]
    assert [set(m) for m in masks] == [{"ground_truth", "prediction"}] * 3
    assert all((wandb_run.dir / "files" / m[k]["path"]).is_file() for m in masks for k in m)
    # the fixed sample spreads over the test set: first, middle and last of the 14 images
    captions = wandb_run.summary["test/overlays/captions"]
    assert [c.split(" (")[1].split(")")[0] for c in captions] == ["good", "scratch", "spot"]
    assert len(wandb_run.media("score_histogram_*.png")) == 1
    (table_file,) = wandb_run.media("per_image_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["index", "path", "defect_type", "label", "score"]
    assert len(table["data"]) == 4 + 2 * 5  # every test image once (5 per defect type)
    assert {row[2] for row in table["data"]} == {"good", "scratch", "spot"}
    assert sorted(row[3] for row in table["data"]) == [0] * 4 + [1] * 10
