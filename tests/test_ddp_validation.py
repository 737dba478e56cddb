"""DDP validation on the CPU (2 gloo processes): a split with anomalies on one rank only."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_commands import run  # noqa: E402

# Every rank saves its calibrated thresholds and its count of validated images at the end.
PROBE = """
import pytorch_lightning as pl, torch

class ThresholdProbe(pl.Callback):
    def __init__(self, out):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        cal = pl_module.model.calibration
        torch.save({"image": cal.image_threshold.clone(), "pixel": cal.pixel_threshold.clone(),
                    "fitted": bool(cal.fitted), "n": pl_module._calibrated_from},
                   f"{self.out}/thresholds_rank{trainer.global_rank}.pt")
"""


@pytest.mark.slow
def test_validation_with_anomalies_on_one_rank_finishes_with_equal_thresholds(
    synthetic_root, tmp_path
):
    category = tmp_path / "synthetic"
    shutil.copytree(synthetic_root / "synthetic", category)
    val = tmp_path / "val"
    # Sorted: crack/ first. The distributed sampler deals indices 0, 2 to rank 0 (the crack
    # image and a normal one) and 1, 3 to rank 1 (normal only): anomalies on rank 0 alone.
    # Validation images are neither test images (an unused defect type, 3 held-out train
    # images) nor trained on.
    (val / "crack").mkdir(parents=True)
    (val / "good").mkdir()
    shutil.copy(category / "test" / "scratch" / "000.png", val / "crack" / "000.png")
    for i in range(3):
        shutil.move(category / "train" / "good" / f"{i:03d}.png", val / "good" / f"{i:03d}.png")
    (tmp_path / "threshold_probe.py").write_text(PROBE)
    run("cfa_lightning.train", "+experiment=demo", "data=folder", f"data.root={category}",
        "data.normal_dir=train/good", "data.abnormal_dirs=[test/spot]",
        "data.mask_dir=ground_truth/spot", "data.normal_test_dir=test/good", f"data.val_dir={val}",
        "data.val_anomalies=none",  # the split's own (real) anomaly, on one rank
        "data.image_size=[64,80]", "data.num_workers=0", "data.eval_batch_size=4",
        "trainer.max_epochs=1", "+protocol=last_epoch", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        "logger=none", "+callbacks.probe._target_=threshold_probe.ThresholdProbe",
        f"+callbacks.probe.out={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}",
        env={"PYTHONPATH": str(tmp_path)})  # fmt: skip
    ranks = [torch.load(tmp_path / f"thresholds_rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["fitted"] and ranks[1]["fitted"]
    assert ranks[0]["n"] == ranks[1]["n"] == 3  # the normal images of both ranks, no padding
    assert torch.equal(ranks[0]["image"], ranks[1]["image"])
    assert torch.equal(ranks[0]["pixel"], ranks[1]["pixel"])
