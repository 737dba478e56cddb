"""Two "nodes" as SLURM starts them: each rank a process of its own with SLURM's environment.

This is what the submitit launcher's srun does for `hydra/launcher=slurm trainer=ddp
trainer.num_nodes=2`: one task per GPU on every node, Lightning reading rank, node and world
size from SLURM. Here both nodes are this machine, one CPU rank each (gloo).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_commands import ROOT, run  # noqa: E402
from test_ddp import DATA, PROBE, assert_same_rows  # noqa: E402


def slurm_env(rank: int, n_nodes: int) -> dict[str, str]:
    """The variables srun sets for task `rank` of a job of n_nodes nodes x 1 task."""
    return {
        "SLURM_JOB_ID": "4242",  # Lightning derives the rendezvous port from it
        "SLURM_JOB_NAME": "cfa",  # not "bash": a batch job, not an interactive shell
        "SLURM_NODELIST": "localhost",
        "SLURM_NTASKS": str(n_nodes),
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": str(n_nodes),
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": str(rank),
    }


@pytest.mark.slow
def test_two_slurm_nodes_build_the_bank_of_a_single_process(tmp_path):
    (tmp_path / "bank_probe.py").write_text(PROBE)
    probe = ["+callbacks.probe._target_=bank_probe.BankProbe", f"+callbacks.probe.out={tmp_path}"]
    data = [f"data.root={tmp_path / 'data'}", *DATA, "logger=none"]
    # one process (it also writes the data set that both nodes then read)
    run("cfa_lightning.train", "+experiment=demo", *data, *probe, f"hydra.run.dir={tmp_path / 'one'}",
        env={"PYTHONPATH": str(tmp_path)})  # fmt: skip

    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    command = [sys.executable, "-m", "cfa_lightning.train", "+experiment=demo", *data, *probe,
               "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1",
               "trainer.num_nodes=2", f"hydra.run.dir={tmp_path / 'two'}"]  # fmt: skip
    nodes = [
        subprocess.Popen(
            command,
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={
                **base,
                **slurm_env(rank, 2),
                "PYTHONPATH": str(tmp_path),
                "WANDB_MODE": "offline",
            },
        )  # fmt: skip
        for rank in (0, 1)
    ]
    logs = [node.communicate(timeout=900)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    # world size 2 from devices=1 x num_nodes=2: ranks and nodes came from SLURM's variables
    assert "MEMBER: 1/2" in logs[0] and "MEMBER: 2/2" in logs[1]

    ranks = [torch.load(tmp_path / f"rank{r}_of2.pt") for r in (0, 1)]
    reference = torch.load(tmp_path / "rank0_of1.pt")
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert torch.equal(ranks[0]["centres"], ranks[1]["centres"])
    # the bank of the two nodes (each half the batches) is the one of the whole training set: the
    # default coreset takes every patch of these small images, gathered in rank order
    assert_same_rows(ranks[0]["centres"], reference["centres"])
