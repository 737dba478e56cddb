"""DDP validation on the CPU (2 gloo processes): a split with anomalies on one rank only."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_commands import SMALL, run  # noqa: E402

# Every rank saves its calibrated thresholds and its count of validated images at the end.
PROBE = """
import pytorch_lightning as pl, torch

class ThresholdProbe(pl.Callback):
    def __init__(self, out):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        cal = pl_module.model.calibration
        torch.save({"image": cal.image_threshold.clone(), "pixel": cal.pixel_threshold.clone(),
                    "fitted": bool(cal.fitted), "n": pl_module.calibrator.n_images},
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


# Every rank saves the monitored value of each validation and what selection made of them.
SELECTION_PROBE = """
import pytorch_lightning as pl, torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

class SelectionProbe(pl.Callback):
    def __init__(self, out, monitor):
        self.out, self.monitor, self.values = out, monitor, []

    def on_validation_end(self, trainer, pl_module):
        self.values.append(float(trainer.callback_metrics[self.monitor]))

    def on_train_end(self, trainer, pl_module):
        best = next(c for c in trainer.callbacks
                    if isinstance(c, ModelCheckpoint) and c.monitor == self.monitor)
        stop = next(c for c in trainer.callbacks if isinstance(c, EarlyStopping))
        torch.save({"values": self.values, "best_score": float(best.best_model_score),
                    "best_path": best.best_model_path, "stopped_epoch": stop.stopped_epoch},
                   f"{self.out}/selection_rank{trainer.global_rank}.pt")
"""


@pytest.mark.slow
def test_the_validated_default_selects_the_same_epoch_on_every_rank(tmp_path):
    """The default protocol under 2-process DDP: each rank validates its half of the synthetic
    validation set; the monitored metric, the best checkpoint and the stop are the same on both."""
    (tmp_path / "selection_probe.py").write_text(SELECTION_PROBE)
    out = tmp_path / "run"
    run("cfa_lightning.train", "+experiment=demo", f"data.root={tmp_path / 'data'}", *SMALL[:-1],
        "data.num_workers=0", "trainer.max_epochs=3", "callbacks.early_stopping.patience=1",
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "logger=none",
        "+callbacks.probe._target_=selection_probe.SelectionProbe",
        f"+callbacks.probe.out={tmp_path}", "+callbacks.probe.monitor=val/pixel_AUPRO",
        f"hydra.run.dir={out}", env={"PYTHONPATH": str(tmp_path)})  # fmt: skip
    ranks = [torch.load(tmp_path / f"selection_rank{r}.pt") for r in (0, 1)]
    assert len(ranks[0]["values"]) >= 2  # epoch 0 and at least one trained epoch
    assert ranks[0] == ranks[1]
    result = json.loads((out / "metrics.json").read_text())
    assert result["world_size"] == 2 and result["selection"]["rule"] == "best_val"
    assert result["selection"]["value"] == pytest.approx(ranks[0]["best_score"])


# Validation on 3 gloo processes where one rank's share holds no normal image: 2 normal images
# first, then 5 with a defect. The distributed sampler deals 0, 3, 6 to rank 0; 1, 4 and a padded
# copy of 0 to rank 1; 2, 5 and a padded copy of 1 to rank 2, which so scores defects only.
N_NORMAL, N_DEFECT, WORLD = 2, 5, 3


class DefectImages(torch.utils.data.Dataset):
    """Random images; the defective ones carry a bright square, their mask marks it."""

    def __init__(self, n_normal: int, n_defect: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n_normal + n_defect, 3, 64, 80, generator=generator) * 0.5
        self.masks = torch.zeros(n_normal + n_defect, 1, 64, 80)
        for i in range(n_normal, n_normal + n_defect):
            y, x = 8 + 4 * (i % 5), 10 + 6 * (i % 7)
            self.images[i, :, y : y + 12, x : x + 12] = 1.0
            self.masks[i, :, y : y + 12, x : x + 12] = 1.0
        self.labels = (self.masks.flatten(1).amax(dim=1) > 0).long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "mask": self.masks[i], "label": self.labels[i],
                "synthetic": torch.tensor(True)}  # fmt: skip


def _fitted_module(state: dict | None = None):
    from tiny_models import tiny_module

    pl.seed_everything(0)
    module = tiny_module()
    if state is None:
        train = DefectImages(4, 0, seed=1)  # normal images only
        module.build_bank(torch.utils.data.DataLoader(train, batch_size=2))
    else:
        module.load_state_dict(state)
    return module


def _validate(module, **trainer_options) -> dict[str, float]:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, **trainer_options)  # fmt: skip
    loader = torch.utils.data.DataLoader(DefectImages(N_NORMAL, N_DEFECT), batch_size=2)
    trainer.validate(module, dataloaders=loader, verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def _validate_on_rank(rank: int, port: int, out: str) -> None:
    import datetime
    import os

    from pytorch_lightning.strategies import DDPStrategy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD),
                      NODE_RANK="0", LOCAL_RANK=str(rank), RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    module = _fitted_module(torch.load(f"{out}/state.pt"))
    # a collective that waits for a rank that never comes fails after 60 s instead of hanging
    strategy = DDPStrategy(process_group_backend="gloo", timeout=datetime.timedelta(seconds=60))
    metrics = _validate(module, devices=WORLD, strategy=strategy)
    torch.save({"metrics": metrics, "normal": module._val.normal}, f"{out}/rank{rank}.pt")


@pytest.mark.slow
def test_a_rank_without_normal_images_validates_like_one_process(tmp_path):
    import socket

    module = _fitted_module()
    torch.save(module.state_dict(), tmp_path / "state.pt")
    single = _validate(_fitted_module(module.state_dict()), devices=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_validate_on_rank, args=(port, str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert [r["normal"] for r in ranks] == [1, 1, 0]  # rank 2 saw no normal image
    expected = {"val/loss", "val/score_mean", "val/image_AUROC", "val/pixel_AUPRO",
                "val/image_threshold", "val/pixel_threshold"}  # fmt: skip
    assert expected <= single.keys()
    for r in ranks:
        assert r["metrics"].keys() == single.keys()
        for key, value in single.items():
            if key.startswith("val/"):
                assert r["metrics"][key] == pytest.approx(value, rel=1e-5), key
