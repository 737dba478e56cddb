"""DDP on the CPU (2 processes, gloo): identical banks and radii, metrics without padded duplicates."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_commands import SMALL, run  # noqa: E402
from wandb_files import OfflineRun  # noqa: E402

# A probe callback, imported by the training processes from PYTHONPATH: every rank saves its bank
# and radius once the bank is built, and its radius at the end of training.
PROBE = """
import pytorch_lightning as pl, torch

class BankProbe(pl.Callback):
    def __init__(self, out):
        self.out = out

    def on_train_start(self, trainer, pl_module):
        self.start = {"centres": pl_module.model.bank.centres.detach().cpu().clone(),
                      "radius_start": pl_module.model.loss_fn.radius.detach().cpu().clone()}

    def on_train_end(self, trainer, pl_module):
        torch.save({**self.start, "radius_end": pl_module.model.loss_fn.radius.detach().cpu().clone(),
                    "world_size": trainer.world_size},
                   f"{self.out}/rank{trainer.global_rank}_of{trainer.world_size}.pt")
"""
# 5 normal + 2 x 4 defect images = 13 test images: odd, so the distributed sampler pads one;
# eval batches of 4 put the padded duplicate inside a partial last batch.
DATA = [o for o in SMALL if not o.startswith(("data.n_test", "trainer.max_epochs"))]
DATA += [
    "data.n_test_good=5",
    "data.n_test_defect=4",
    "data.eval_batch_size=4",
    "trainer.max_epochs=1",
]


@pytest.mark.slow
def test_ddp_two_processes_match_a_single_process(tmp_path):
    (tmp_path / "bank_probe.py").write_text(PROBE)
    probe = ["+callbacks.probe._target_=bank_probe.BankProbe", f"+callbacks.probe.out={tmp_path}"]
    env = {"PYTHONPATH": str(tmp_path), "WANDB_API_KEY": ""}
    data = [f"data.root={tmp_path / 'data'}", *DATA]
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    run("cfa_lightning.train", "+experiment=demo", *data, *probe, "trainer=ddp", "trainer.accelerator=cpu",
        "trainer.devices=2", "logger=wandb", f"hydra.run.dir={ddp}", env=env)  # fmt: skip
    run("cfa_lightning.train", "+experiment=demo", *data, *probe, "logger=none",
        f"hydra.run.dir={single}", env=env)  # fmt: skip

    ranks = [torch.load(tmp_path / f"rank{r}_of2.pt") for r in (0, 1)]
    reference = torch.load(tmp_path / "rank0_of1.pt")
    # every rank holds the identical bank and radius, at the start and at the end of training
    assert torch.equal(ranks[0]["centres"], ranks[1]["centres"])
    assert torch.equal(ranks[0]["radius_start"], ranks[1]["radius_start"])
    assert torch.equal(ranks[0]["radius_end"], ranks[1]["radius_end"])
    # ... and it is the bank a single process builds from the whole training set
    assert torch.allclose(
        ranks[0]["centres"], reference["centres"], rtol=1e-5, atol=1e-5
    )  # float32 sums in other thread counts

    # test metrics of the DDP run = a single process scoring the same weights (no duplicates)
    result = json.loads((ddp / "metrics.json").read_text())
    assert result["world_size"] == 2 and result["status"] == "ok"
    run("cfa_lightning.eval", f"ckpt_path={ddp / 'checkpoints' / 'last.ckpt'}", "data=synthetic",
        *data[:-1], f"hydra.run.dir={tmp_path / 'eval'}", env=env)  # fmt: skip
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert evaluated.keys() == result["metrics"].keys()
    for key, value in result["metrics"].items():
        # float32 maps in other thread counts: scores (thresholds ~10) agree to ~1e-6 relative
        assert value == pytest.approx(evaluated[key], rel=1e-5, abs=1e-5), key

    # W&B media from rank 0 only, with the per-image table gathered from both ranks
    (run_dir,) = (ddp / "wandb").glob("offline-run-*")
    (table_file,) = OfflineRun(run_dir).media("per_image_*.table.json")
    rows = json.loads(table_file.read_text())["data"]
    assert sorted(row[0] for row in rows) == list(range(13))
