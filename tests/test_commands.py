"""End-to-end tests of the real commands: train (demo), eval, multirun, the W&B logger."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from wandb_files import OfflineRun  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# 12 training images, 4 of them (0.34) validate with synthetic defects: the validated default.
SMALL = ["data.n_train=12", "data.n_test_good=4", "data.n_test_defect=4", "data.generate_size=[96,96]",
         "data.image_size=96", "data.val_fraction=0.34", "trainer.max_epochs=2"]  # fmt: skip


def run(module: str, *overrides: str, env: dict | None = None, check: bool = True):
    proc = subprocess.run(
        [sys.executable, "-m", module, *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "WANDB_MODE": "offline", **(env or {})},
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`+experiment=demo` (synthetic data, real lite0 weights), shrunk to a few seconds; the
    validated default with a patience of 1, so that early stopping ends it before the cap."""
    tmp = tmp_path_factory.mktemp("demo")
    out = tmp / "run"
    proc = run("cfa_lightning.train", "+experiment=demo", f"data.root={tmp / 'data'}", *SMALL[:-1],
               "trainer.max_epochs=4", "callbacks.early_stopping.patience=1",
               f"hydra.run.dir={out}")  # fmt: skip
    return tmp, out, proc


def test_demo_trains_and_tests_end_to_end(demo_run):
    _, out, proc = demo_run
    result = json.loads((out / "metrics.json").read_text())
    m = result["metrics"]
    assert result["protocol"] == "validated" and result["seed"] == 0 and result["tested"]
    assert result["backbone"] == "tf_efficientnet_lite0" and result["input_size"] == [96, 96]
    # Drawn defects with real ImageNet features, seed 0, this config: the positional bank at three
    # taps measured AUPRO 0.9534; the default coreset at strides 8 and 16 (every patch of these
    # small images a centre) measured 0.9289 (2-core AMD EPYC). The synthetic defects are
    # coarse; on the four real development products the coreset won (docs/training.md).
    assert m["test/image_AUROC"] >= 0.99
    assert m["test/pixel_AUROC"] >= 0.975
    assert m["test/pixel_AUPRO"] >= 0.92
    assert "test/image_AUROC" in proc.stdout  # the metrics table is printed
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert "Building memory bank" in proc.stderr  # progress bar for the bank
    assert "memory bank (coreset) built from 8 training images" in proc.stderr  # 4 of 12 validate


def test_the_validated_default_tests_the_best_epoch_and_stops_early(demo_run):
    _, out, proc = demo_run
    result = json.loads((out / "metrics.json").read_text())
    sel = result["selection"]
    curve = dict((int(e), v) for e, v in sel["val_curve"])
    # epoch 0 (the un-adapted phi) is validated like any other; the validated epochs are 0..stop
    assert sorted(curve) == list(range(sel["stopped_epoch"] + 1))
    best = max(curve, key=lambda e: (curve[e], -e))  # ties keep the earlier epoch
    assert sel["rule"] == "best_val" and sel["metric"] == "val/pixel_AUPRO"
    assert sel["epoch"] == best and sel["value"] == pytest.approx(curve[best])
    assert result["val_metrics"]["val/pixel_AUPRO"] == pytest.approx(curve[best])
    # early stopping: patience 1, so the fit ended one validated epoch after the best one
    assert sel["early_stopped"] and sel["patience"] == 1
    assert sel["stopped_epoch"] == best + 1 < 4 and result["epochs"] == sel["stopped_epoch"]
    # the tested model is the best checkpoint, epoch k = the model after k training epochs
    assert Path(sel["checkpoint"]) == out / "checkpoints" / f"epoch_{best:03d}.ckpt"
    assert f"Loaded model weights from the checkpoint at {sel['checkpoint']}" in proc.stderr
    ckpt = torch.load(sel["checkpoint"], weights_only=True)
    assert ckpt["epoch"] == best


def test_the_run_ends_with_a_summary_and_the_selection_curve(demo_run):
    """The chosen epoch and why, its checkpoint (the path README's Quick start uses), the test
    metrics and the run folder, as metrics.json has them; the curve PNG in the run folder."""
    from PIL import Image

    _, out, proc = demo_run
    result = json.loads((out / "metrics.json").read_text())
    sel = result["selection"]
    summary = proc.stdout.split("run summary\n", 1)[1].splitlines()[:7]
    lines = dict(line.split(maxsplit=1) for line in summary)
    assert lines["checkpoint"] == sel["checkpoint"] and Path(sel["checkpoint"]).is_file()
    assert lines["chosen"].startswith(f"epoch {sel['epoch']}")
    assert ("the un-adapted model" in lines["chosen"]) == (sel["epoch"] == 0)
    assert lines["why"].startswith(f"the best val/pixel_AUPRO on validation, {sel['value']:.4f}")
    assert lines["stopped"].startswith(f"early, after epoch {sel['stopped_epoch']}: 1 validated")
    assert f"test/pixel_AUPRO {result['metrics']['test/pixel_AUPRO']:.4f}" in lines["test"]
    assert lines["curve"] == str(out / "selection_curve.png")
    assert Image.open(lines["curve"]).size == (720, 420)
    assert lines["run"].startswith(f"folder  {out} ")


def test_eval_scores_the_checkpoint_like_training_did(demo_run, tmp_path):
    tmp, out, _ = demo_run
    trained = json.loads((out / "metrics.json").read_text())
    ckpt = trained["selection"]["checkpoint"]  # the tested (best validated) checkpoint
    run("cfa_lightning.eval", f"ckpt_path={ckpt}", "data=synthetic", f"data.root={tmp / 'data'}",
        *SMALL[:-1], f"hydra.run.dir={tmp_path}")  # fmt: skip
    evaluated = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert evaluated.keys() == trained["metrics"].keys()
    for key, value in trained["metrics"].items():
        assert evaluated[key] == pytest.approx(value, abs=1e-6), key


def test_eval_refuses_a_checkpoint_from_another_resolution(demo_run, tmp_path):
    tmp, out, _ = demo_run
    proc = run("cfa_lightning.eval", f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}", "data=synthetic",
               f"data.root={tmp / 'data'}", "data.image_size=64", f"hydra.run.dir={tmp_path}", check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "trained at input size [96, 96]" in proc.stderr


def test_multirun_over_radius_and_gamma_c(tmp_path):
    proc = run("cfa_lightning.train", "-m", "+experiment=demo", f"data.root={tmp_path / 'data'}", *SMALL[:-1],
               "trainer.max_epochs=1", "model.radius=1e-5,1e-3", "model.gamma_c=1,4",
               f"hydra.sweep.dir={tmp_path / 'sweep'}", "callbacks=selection", "logger=none")  # fmt: skip
    results = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert len(results) == 4, proc.stdout[-2000:]
    seen = {
        (r["radius_init"], r["gamma_c"]) for r in map(lambda p: json.loads(p.read_text()), results)
    }
    assert seen == {(1e-5, 1), (1e-5, 4), (1e-3, 1), (1e-3, 4)}
    assert {
        (r["K"], r["J"], r["alpha"]) for r in map(lambda p: json.loads(p.read_text()), results)
    } == {(1, 3, 0.1)}  # aggregate.py tells a K sweep's settings apart by these
    assert any("model.gamma_c=4" in p.parent.name for p in results)  # folders name the values


def test_multirun_over_bank_constructions_and_size(tmp_path):
    proc = run("cfa_lightning.train", "-m", "+experiment=demo", f"data.root={tmp_path / 'data'}", *SMALL[:-1],
               "trainer.max_epochs=1", "model/bank=positional,kmeans,coreset",
               "model.bank.size=0.05",
               f"hydra.sweep.dir={tmp_path / 'sweep'}", "callbacks=selection", "logger=none")  # fmt: skip
    paths = sorted((tmp_path / "sweep").glob("*/metrics.json"))  # one folder per job
    assert len(paths) == 3, proc.stdout[-2000:]
    assert any("model.bank=kmeans" in p.parent.name for p in paths)  # folders name the values
    results = [json.loads(p.read_text()) for p in paths]
    built = {r["bank"]["construction"]: r["bank_centres"] for r in results}
    hw = built["positional"]  # (h * w): the size is ignored by the positional bank
    assert built["kmeans"] == built["coreset"] == round(0.05 * 8 * hw)  # 8 of 12 images train
    assert all(r["status"] == "ok" and r["bank_build_s"] > 0 for r in results)


def test_wandb_logger_works_offline_without_an_account(tmp_path):
    out = tmp_path / "run"
    run("cfa_lightning.train", "+experiment=demo", f"data.root={tmp_path / 'data'}", *SMALL[:-1],
        "trainer.max_epochs=1", "logger=wandb", f"hydra.run.dir={out}",
        env={"WANDB_API_KEY": "", "WANDB_DIR": str(out)})  # fmt: skip
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")), "W&B wrote no run file"
    # the per-epoch validation curves as one line plot: epochs 0 (un-adapted) and 1
    (table,) = OfflineRun(runs[0]).media("curves*.table.json")
    data = json.loads(table.read_text())["data"]  # rows: [epoch, line key, value]
    assert {row[0] for row in data} == {0, 1} and {row[1] for row in data} >= {"val/pixel_AUPRO"}


@pytest.mark.slow  # three training commands: about a minute on a quiet 2-core CPU
def test_an_input_too_small_stops_before_the_bank_and_the_smallest_runs(tmp_path):
    small = ["+experiment=demo", f"data.root={tmp_path / 'data'}", *SMALL[:4],
             "data.val_fraction=0.34", "trainer.max_epochs=1", "logger=none"]  # fmt: skip
    for name, size in (("s16", "16"), ("s8", "[8,8]")):
        proc = run("cfa_lightning.train", *small, f"data.image_size={size}",
                   f"hydra.run.dir={tmp_path / name}", check=False)  # fmt: skip
        assert proc.returncode != 0 and "Building memory bank" not in proc.stderr
        assert "model input, under the 17 px per side" in proc.stderr
        assert "the smallest value that works is data.image_size=17" in proc.stderr
        assert "Padding size" not in proc.stderr and "changed no pixels" not in proc.stderr
    proc = run("cfa_lightning.train", *small, "data.image_size=auto", "data.pixels=256",
               f"hydra.run.dir={tmp_path / 'auto'}", check=False)  # fmt: skip
    assert (
        proc.returncode != 0 and "the smallest value that works is data.pixels=1024" in proc.stderr
    )
    run("cfa_lightning.train", *small, "data.image_size=17", f"hydra.run.dir={tmp_path / 'ok'}")
    assert json.loads((tmp_path / "ok" / "metrics.json").read_text())["tested"]


def test_auto_size_is_chosen_recorded_and_reused_by_eval_and_predict(tmp_path):
    """data.image_size=auto on 48 x 128 images: the training command logs and records the size,
    and eval and the Python API take it from the checkpoint without being told."""
    from PIL import Image

    from cfa_lightning.inference import Predictor

    out, data = tmp_path / "run", tmp_path / "data"
    proc = run("cfa_lightning.train", "+experiment=demo", f"data.root={data}", *SMALL[:4],
               "data.generate_size=[48,128]", "data.image_size=auto", "data.pixels=6144",
               "data.val_fraction=0.34", "trainer.max_epochs=1", "logger=none",
               f"hydra.run.dir={out}")  # fmt: skip
    assert "data.image_size=auto: 8 training images, their aspects agree" in proc.stdout
    assert "model input 48x128" in proc.stdout
    result = json.loads((out / "metrics.json").read_text())
    assert result["input_size"] == [48, 128] and result["image_size"] == [48, 128]
    assert result["auto_size"]["pixels"] == 6144 and result["auto_size"]["stride"] == 16
    ckpt_path = out / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert ckpt["datamodule_hyper_parameters"]["image_size"] == [48, 128]
    assert ckpt["hyper_parameters"]["input_size"] == [48, 128]
    run("cfa_lightning.eval", f"ckpt_path={ckpt_path}", "data=synthetic", f"data.root={data}",
        "logger=none", f"hydra.run.dir={tmp_path / 'eval'}")  # fmt: skip
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["input_size"] == [48, 128] and evaluated["image_size"] == [48, 128]
    result = Predictor.from_checkpoint(ckpt_path).predict(Image.new("RGB", (300, 90)))
    assert result.anomaly_map.shape == (90, 300) and result.mask.shape == (90, 300)
