"""eval.py: the data scored is the checkpoint's own, command-line data options on top."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose

from cfa_lightning.eval import data_config

ROOT = Path(__file__).resolve().parents[1]


def _eval_config(ckpt: Path, *overrides: str):
    return compose("eval", overrides=[f"ckpt_path={ckpt}", *overrides], return_hydra_config=True)


def _trained(ckpt: Path) -> dict:
    return torch.load(ckpt, weights_only=True)["datamodule_hyper_parameters"]


def test_the_checkpoints_data_is_scored_with_command_line_options_on_top(
    hydra_ctx, trained_checkpoint, synthetic_root
):
    trained = _trained(trained_checkpoint)
    data, line = data_config(_eval_config(trained_checkpoint), trained)
    assert data._target_ == "cfa_lightning.data.MVTecDataModule"
    assert (data.root, data.category) == (str(synthetic_root), "synthetic")  # not data/mvtec_ad
    assert list(data.image_size) == [64, 80] and data.val_fraction == 0.25
    assert line == (f"scoring the data {trained_checkpoint} was trained on (MVTecDataModule, "
                    f"category synthetic under {synthetic_root})")  # fmt: skip

    cfg = _eval_config(trained_checkpoint, "data.category=other", "data.eval_batch_size=2")
    data, line = data_config(cfg, trained)
    assert (data.root, data.category, data.eval_batch_size) == (str(synthetic_root), "other", 2)
    assert line.endswith("with data.category, data.eval_batch_size from the command line")


def test_a_data_group_on_the_command_line_or_an_old_checkpoint_keeps_eval_yaml(
    hydra_ctx, trained_checkpoint
):
    cfg = _eval_config(trained_checkpoint, "data=synthetic")
    data, line = data_config(cfg, _trained(trained_checkpoint))
    assert data is cfg.data and data.root == "data/synthetic"
    assert line.startswith("scoring data=synthetic from the command line (category synthetic ")
    cfg = _eval_config(trained_checkpoint)
    data, line = data_config(cfg, None)
    assert data is cfg.data and data.category == "bottle"
    assert line == (f"{trained_checkpoint} records no data config (a checkpoint from an older "
                    "version): scoring eval.yaml's data=mvtec (category bottle under "
                    "data/mvtec_ad); give data=... and data.* options to choose")  # fmt: skip


def test_the_data_module_is_told_by_its_arguments_and_unknown_options_are_left_out(
    hydra_ctx, trained_checkpoint
):
    trained = {**_trained(trained_checkpoint), "generator_seed": 0, "n_train": 12, "retired": 1}
    data, line = data_config(_eval_config(trained_checkpoint), trained)
    assert data._target_ == "cfa_lightning.data.SyntheticDataModule" and data.n_train == 12
    assert "retired" not in data and line.endswith("were left out: retired")


def test_eval_without_data_options_scores_the_training_data(trained_checkpoint, synthetic_root,
                                                            tmp_path):  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "cfa_lightning.eval", f"ckpt_path={trained_checkpoint}",
         f"hydra.run.dir={tmp_path}", "logger=none"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert f"(MVTecDataModule, category synthetic under {synthetic_root})" in log
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert result["category"] == "synthetic" and result["root"] == str(synthetic_root)
    assert "test/image_AUROC" in result["metrics"]
