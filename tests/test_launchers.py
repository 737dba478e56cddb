"""Hydra launcher presets: SLURM job shape, the checks before launch, and real Ray/submitit sweeps."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hydra import compose
from hydra.core.plugins import Plugins
from omegaconf import OmegaConf

from cfa_lightning.callbacks import LauncherCheck
from cfa_lightning.callbacks.launcher_check import LauncherCheckError, check_ray_address

sys.path.insert(0, str(Path(__file__).parent))
from test_commands import ROOT, SMALL, run  # noqa: E402
from wandb_files import OfflineRun  # noqa: E402

PRESETS = ("ray_gpus", "slurm", "local_submitit")
needs_plugins = pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None
    or importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None,
    reason="the [cluster] extra is not installed",
)


def _multirun_config(*overrides: str):
    """The launching process's config of `cfa-train -m <overrides>` (as callbacks see it)."""
    return compose("train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_compose_and_name_a_launcher_plugin(hydra_ctx, preset):
    cfg = _multirun_config(f"hydra/launcher={preset}", "+experiment=demo")
    assert cfg.hydra.launcher._target_.startswith("hydra_plugins.hydra_")


@needs_plugins
def test_slurm_preset_shapes_a_two_node_ddp_job(hydra_ctx, tmp_path, monkeypatch):
    """The real submitit plugin builds the sbatch script of a 2-node DDP job (nothing submitted)."""
    import submitit

    cfg = _multirun_config("hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2",
                           "trainer.accelerator=gpu", "hydra.launcher.partition=gpu",
                           "hydra.launcher.account=vision", "hydra.launcher.timeout_min=90",
                           f"hydra.sweep.dir={tmp_path}", "+experiment=wide_resnet50")  # fmt: skip
    LauncherCheck().on_multirun_start(cfg)  # DDP is allowed under SLURM
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (2, 2, 2)

    fake_bin = tmp_path / "bin"  # submitit looks for srun before it builds a SLURM executor
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{Path(sys.executable).parent}:/usr/bin:/bin")
    executors = []
    monkeypatch.setattr(
        submitit.AutoExecutor, "map_array", lambda ex, *a: executors.append(ex) or []
    )
    launcher = Plugins.instance().instantiate_launcher(
        hydra_context=None, task_function=lambda c: None, config=cfg
    )
    assert type(launcher).__name__ == "SlurmLauncher"
    launcher.launch([["seed=0"]], initial_job_idx=0)
    sbatch = executors[0]._executor._make_submission_file_text("python -m x", "uid")
    for line in ("--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=2", "--partition=gpu",
                 "--account=vision", "--time=90"):  # fmt: skip
        assert f"#SBATCH {line}\n" in sbatch, line
    assert "srun" in sbatch  # every task (DDP rank) is started by SLURM, none by Lightning


def test_slurm_cpu_jobs_ask_for_no_gpu_and_a_count_of_devices(hydra_ctx):
    cfg = _multirun_config("hydra/launcher=slurm", "+experiment=demo")
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (1, 1, 0)
    cfg = _multirun_config("hydra/launcher=slurm", "trainer.devices=auto")
    with pytest.raises(Exception, match="a number of devices per node"):
        OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


@pytest.mark.parametrize("launcher", ["basic", pytest.param("ray_gpus", marks=needs_plugins),
                                      pytest.param("local_submitit", marks=needs_plugins)])  # fmt: skip
def test_ddp_in_a_sweep_is_refused_outside_slurm(hydra_ctx, launcher):
    """(Without the plugin, the check names the missing plugin first: the test below.)"""
    overrides = ["trainer=ddp"] + ([f"hydra/launcher={launcher}"] if launcher != "basic" else [])
    with pytest.raises(LauncherCheckError) as err:
        LauncherCheck().on_multirun_start(_multirun_config(*overrides))
    assert "hydra/launcher=slurm" in str(err.value) and "hydra/launcher=ray_gpus" in str(err.value)


def test_a_missing_plugin_names_the_extra(hydra_ctx, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if "ray_launcher" in name else real_find_spec(name, *a))  # fmt: skip
    with pytest.raises(LauncherCheckError, match=r"hydra/launcher=ray_gpus .* hydra-ray-launcher"
                                                 r".*pip install 'cfa-lightning\[cluster\]'"):  # fmt: skip
        LauncherCheck().on_multirun_start(_multirun_config("hydra/launcher=ray_gpus"))


def test_a_refused_ray_address_stops_at_once():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.perf_counter()
    with pytest.raises(LauncherCheckError, match=f"address=127.0.0.1:{port} cannot be reached"):
        check_ray_address(f"127.0.0.1:{port}", timeout_s=5)
    assert time.perf_counter() - start < 5


@needs_plugins
def test_a_ray_address_that_never_answers_stops_within_the_timeout():
    """A server that accepts connections and stays silent (a firewall, a wrong service)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []

    def accept_and_stay_silent() -> None:
        with contextlib.suppress(OSError):  # the socket is closed at the end of the test
            while True:
                held.append(server.accept())

    threading.Thread(target=accept_and_stay_silent, daemon=True).start()
    address = f"127.0.0.1:{server.getsockname()[1]}"
    start = time.perf_counter()
    try:
        with pytest.raises(
            LauncherCheckError, match=f"address={address} cannot be reached within 3 s"
        ):
            check_ray_address(address, timeout_s=3)
    finally:
        server.close()
    assert time.perf_counter() - start < 6


def test_a_service_that_is_not_ray_is_refused():
    """A port that answers, but not as a gRPC server (here an HTTP/1 server)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def answer_http() -> None:
        with contextlib.suppress(OSError):
            conn, _ = server.accept()
            conn.recv(1024)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            conn.close()

    threading.Thread(target=answer_http, daemon=True).start()
    address = f"127.0.0.1:{server.getsockname()[1]}"
    try:
        with pytest.raises(LauncherCheckError, match="not as a gRPC server"):
            check_ray_address(address, timeout_s=5)
    finally:
        server.close()


RAY_HEAD = """
import sys, ray
ray.init(num_cpus=1, include_dashboard=False)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test closes stdin
ray.shutdown()
"""


@pytest.mark.slow
@needs_plugins
def test_a_running_ray_head_passes_the_check():
    head = subprocess.Popen([sys.executable, "-c", RAY_HEAD], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        address = head.stdout.readline().strip()  # host:port of its GCS
        assert address, "the Ray head did not start"
        check_ray_address(address, timeout_s=20)  # no error
    finally:
        head.stdin.close()
        head.wait(timeout=120)


def test_the_cli_stops_on_an_unreachable_ray_address(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = run("cfa_lightning.train", "-m", "+experiment=demo", "hydra/launcher=ray_gpus",
               f"hydra.launcher.ray.init.address=127.0.0.1:{port}",
               f"hydra.sweep.dir={tmp_path / 'sweep'}", check=False)  # fmt: skip
    if importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None:
        assert "pip install 'cfa-lightning[cluster]'" in proc.stderr
    else:
        assert f"address=127.0.0.1:{port} cannot be reached" in proc.stderr
    assert proc.returncode != 0 and not list((tmp_path / "sweep").glob("*/metrics.json"))


# --- real sweeps through the plugins (slow: a local Ray or submitit processes, 2 CPU cores) ---


def _span(job: Path) -> tuple[float, float]:
    """A job's start (Hydra writes .hydra/ first) and end (metrics.json is its last write)."""
    return (job / ".hydra" / "config.yaml").stat().st_mtime, (job / "metrics.json").stat().st_mtime


@pytest.mark.slow
@needs_plugins
@pytest.mark.parametrize("launcher", [
    ["hydra/launcher=ray_gpus", "hydra.launcher.ray.init.num_cpus=2"],  # a local Ray, 2 CPUs
    ["hydra/launcher=local_submitit"],
], ids=["ray", "submitit_local"])  # fmt: skip
def test_demo_sweep_runs_jobs_in_parallel_and_reports_the_failed_one(tmp_path, launcher):
    from cfa_lightning.data.synthetic import generate_synthetic_dataset

    # the jobs read one data set; written first, as a sweep over seeds on real data would find it
    generate_synthetic_dataset(tmp_path / "data", category="synthetic", n_train=12, n_test_good=4,
                               n_test_defect=4, image_size=[96, 96], seed=0)  # fmt: skip
    sweep_dir = tmp_path / "sweep"
    start = time.perf_counter()
    proc = run("cfa_lightning.train", "-m", *launcher, "+experiment=demo",
               f"data.root={tmp_path / 'data'}", *SMALL[:-1], "trainer.max_epochs=1",
               "data.n_train=12,0", "seed=0,1",  # n_train=0 fails in every job that has it
               "logger=wandb", "callbacks.wandb_media.num_images=2",
               f"hydra.sweep.dir={sweep_dir}", env={"WANDB_API_KEY": ""})  # fmt: skip
    print(f"{launcher[0]}: sweep of 4 jobs in {time.perf_counter() - start:.0f} s")
    jobs = {p.name: p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
    assert len(jobs) == 4, proc.stdout[-3000:] + proc.stderr[-3000:]
    ok = sorted(p for name, p in jobs.items() if "data.n_train=12" in name)
    failed = sorted(p for name, p in jobs.items() if "data.n_train=0" in name)
    assert [p.name.endswith(f"_seed{s}") for s, p in enumerate(ok)] == [True, True]

    results = {p: json.loads((p / "metrics.json").read_text()) for p in jobs.values()}
    assert all(results[p]["status"] == "ok" and results[p]["metrics"]["test/image_AUROC"] > 0.5
               for p in ok)  # fmt: skip
    assert all(
        results[p]["status"] == "failed" and "n_train" in results[p]["error"] for p in failed
    )
    status = json.loads((sweep_dir / "sweep_status.json").read_text())
    assert status["n_jobs"] == 4 and sorted(status["failed"]) == sorted(p.name for p in failed)

    (a0, a1), (b0, b1) = _span(ok[0]), _span(ok[1])
    overlap = min(a1, b1) - max(a0, b0)
    print(f"{launcher[0]}: jobs {a1 - a0:.0f} s and {b1 - b0:.0f} s, overlapping {overlap:.0f} s")
    assert overlap > 0.5 * min(a1 - a0, b1 - b0), "the two training jobs did not run at once"

    runs = {p: OfflineRun(next((p / "wandb").glob("offline-run-*"))) for p in jobs.values()}
    assert {r.group for r in runs.values()} == {f"{sweep_dir.parent.name}_{sweep_dir.name}"}
    assert all(runs[p].name == p.name for p in jobs.values())
    assert [runs[p].exit_code for p in ok + failed] == [0, 0, 1, 1]

    # the results table from the sweep folder, as after a basic-launcher sweep
    table = tmp_path / "table"
    subprocess.run([sys.executable, ROOT / "experiments" / "aggregate.py", sweep_dir, "--out", table],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    with open(table / "runs.csv") as f:
        assert sorted(row["status"] for row in csv.DictReader(f)) == ["failed"] * 2 + ["ok"] * 2
    assert "seeds 0, 1" in (table / "results.md").read_text()


# A callback, imported by the jobs from PYTHONPATH, that kills its process outside Python's control.
KILLER = """
import os
import pytorch_lightning as pl

class DieOnSeed(pl.Callback):
    def __init__(self, seed, die_on):
        self.die = seed == die_on

    def on_train_start(self, trainer, pl_module):
        if self.die:
            os._exit(3)
"""


@pytest.mark.slow
@needs_plugins
def test_a_job_that_dies_is_reported_when_the_launcher_gives_up(tmp_path):
    """A dead job makes submitit raise in the launching process; the report is still written."""
    (tmp_path / "killer.py").write_text(KILLER)
    sweep_dir = tmp_path / "sweep"
    proc = run("cfa_lightning.train", "-m", "hydra/launcher=local_submitit", "+experiment=demo",
               f"data.root={tmp_path / 'data'}", *SMALL[:-1], "trainer.max_epochs=1", "seed=0,1",
               "logger=none", "callbacks=none", "+protocol=last_epoch",  # no selection callbacks
               "hydra.sweep.subdir=${hydra.job.num}_seed${seed}",  # all overrides: over 255 chars
               "+callbacks.killer._target_=killer.DieOnSeed",
               "+callbacks.killer.seed=${seed}", "+callbacks.killer.die_on=1",
               f"hydra.sweep.dir={sweep_dir}", env={"PYTHONPATH": str(tmp_path)}, check=False)  # fmt: skip
    assert proc.returncode != 0
    status = json.loads((sweep_dir / "sweep_status.json").read_text())
    (dead,) = [name for name in status["jobs"] if name.endswith("_seed1")]
    assert (
        status["n_jobs"] == 2 and status["failed"] == [dead] and status["jobs"][dead] == "missing"
    )
    assert "the sweep stopped before its end" in proc.stderr + proc.stdout


# A Hydra callback, imported by the jobs from PYTHONPATH: the GPU a job was given, and its span.
GPU_PROBE = """
import json, os, time
from pathlib import Path
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback

class RecordGpu(Callback):
    def on_job_start(self, config, **kwargs):
        self.start = time.time()

    def on_job_end(self, config, job_return, **kwargs):
        out = Path(HydraConfig.get().runtime.output_dir) / "gpu.json"
        out.write_text(json.dumps({"gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),
                                   "start": self.start, "end": time.time()}))
"""


def test_ray_gives_a_job_one_gpu_where_there_are_gpus(monkeypatch):
    from cfa_lightning.config import ray_gpus_per_job

    assert ray_gpus_per_job("10.0.0.5:6379") == 1  # a cluster's nodes have the GPUs
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert ray_gpus_per_job(None) == 1
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert ray_gpus_per_job(None) == 0


@pytest.mark.slow
@needs_plugins
def test_ray_runs_one_job_per_gpu_and_a_gpu_takes_the_next_job(tmp_path):
    """Ray told that this machine has 2 GPUs (logical ones: Ray only counts them) and 4 CPUs."""
    (tmp_path / "gpu_probe.py").write_text(GPU_PROBE)
    sweep_dir = tmp_path / "sweep"
    run("cfa_lightning.train", "-m", "hydra/launcher=ray_gpus", "hydra.launcher.ray.init.num_cpus=4",
        "hydra.launcher.ray.init.num_gpus=2", "hydra.launcher.ray.remote.num_gpus=1",
        "+hydra.callbacks.gpu_probe._target_=gpu_probe.RecordGpu", "+experiment=demo",
        "data.n_train=0", "seed=0,1,2,3",  # jobs that stop at once: only the scheduling is timed
        "logger=none", f"hydra.sweep.dir={sweep_dir}", env={"PYTHONPATH": str(tmp_path)})  # fmt: skip
    jobs = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/gpu.json"))]
    assert len(jobs) == 4
    assert all(job["gpus"] in ("0", "1") for job in jobs), jobs  # one GPU each
    for job in jobs:  # never more jobs at once than GPUs
        running = [o for o in jobs if o["start"] <= job["start"] < o["end"]]
        assert len(running) <= 2, jobs
    assert {job["gpus"] for job in jobs} == {"0", "1"}


def test_the_cli_names_the_extra_when_the_plugin_is_missing(tmp_path):
    """The Ray plugin hidden from the command (as if never installed): it stops before any job."""
    hide_and_run = (
        "import sys; sys.modules['hydra_plugins.hydra_ray_launcher'] = None; "
        "from cfa_lightning.train import main; main()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", hide_and_run, "-m", "+experiment=demo", "hydra/launcher=ray_gpus",
         f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "hydra/launcher=ray_gpus needs the Hydra plugin hydra-ray-launcher" in proc.stderr
    assert "pip install 'cfa-lightning[cluster]'" in proc.stderr
    assert not (tmp_path / "sweep").exists()
