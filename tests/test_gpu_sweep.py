"""experiments/gpu_sweep.py: job expansion and one-job-per-GPU assignment, checked on the CPU."""

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_sweep", ROOT / "experiments" / "gpu_sweep.py")
gpu_sweep = importlib.util.module_from_spec(spec)
sys.modules["gpu_sweep"] = gpu_sweep  # dataclasses look their module up
spec.loader.exec_module(gpu_sweep)

# A stand-in for a training job: records its GPU and time span, sleeps, fails when told to.
FAKE_JOB = """
import json, os, sys, time
start = time.time()
time.sleep(0.3)
with open(sys.argv[1], "w") as f:
    json.dump({"gpu": os.environ["CUDA_VISIBLE_DEVICES"], "start": start, "end": time.time(),
               "group": os.environ.get("CFA_SWEEP_GROUP")}, f)
sys.exit(3 if sys.argv[2] == "fail" else 0)
"""


def test_expansion_is_the_product_and_the_command_line_wins():
    jobs = gpu_sweep.expand_overrides(
        ["+experiment=demo", "seed=5,6"], {"data.category": "a,b,c", "seed": "0,1,2"}
    )
    assert len(jobs) == 6
    assert jobs[0] == ["data.category=a", "+experiment=demo", "seed=5"]
    assert {tuple(j) for j in jobs} == {
        (f"data.category={c}", "+experiment=demo", f"seed={s}") for c in "abc" for s in (5, 6)
    }


def test_sweep_configs_expand_to_their_job_counts():
    for sweep, n in (("categories", 45), ("ablation", 27), ("resolutions", 90), ("demo_seeds", 3)):
        overrides = ["+experiment=demo", f"+sweep={sweep}"]
        params, sweep_dir = gpu_sweep.compose_sweep(overrides)
        assert len(gpu_sweep.expand_overrides(overrides, params)) == n, sweep
        assert f"train_{sweep}" in sweep_dir


def test_one_job_per_gpu_at_a_time_and_a_failure_does_not_stop_the_others(tmp_path):
    jobs = [gpu_sweep.Job(i, [f"x={i}"]) for i in range(7)]

    def command(job):
        return [sys.executable, "-c", FAKE_JOB, str(tmp_path / f"{job.num}.json"),
                "fail" if job.num == 2 else "ok"]  # fmt: skip

    results = gpu_sweep.run_on_gpus(jobs, ["0", "1", "2"], command, log_dir=tmp_path / "logs",
                                    env={"CFA_SWEEP_GROUP": "g"})  # fmt: skip
    assert [r.job.num for r in results] == list(range(7))
    assert [r.returncode for r in results] == [0, 0, 3, 0, 0, 0, 0]
    runs = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(7)]
    assert {r["group"] for r in runs} == {"g"}
    assert {r.gpu for r in results} == {"0", "1", "2"}
    for run, result in zip(runs, results, strict=True):
        assert run["gpu"] == result.gpu  # the job saw the GPU it was given
    for gpu in "012":  # never two jobs on one GPU at once
        spans = sorted((r["start"], r["end"]) for r in runs if r["gpu"] == gpu)
        assert all(
            a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False)
        )
    assert (tmp_path / "logs" / "job_2.log").is_file()


def test_job_command_names_the_folder_like_a_multirun(tmp_path):
    cmd = gpu_sweep.job_command(gpu_sweep.Job(4, ["seed=1", "data.category=screw"]), tmp_path)
    assert cmd[1:3] == ["-m", "cfa_lightning.train"]
    assert cmd[-1] == f"hydra.run.dir={tmp_path}/4_${{hydra.job.override_dirname}}_seed${{seed}}"


def test_dry_run_lists_the_jobs(capsys):
    assert (
        gpu_sweep.main(["--gpus", "0,1", "--dry-run", "+experiment=demo", "+sweep=demo_seeds"]) == 0
    )
    out = capsys.readouterr().out
    assert "3 jobs on GPUs ['0', '1']" in out and "seed=2" in out


def test_dry_run_of_command_line_sweeps_without_a_sweep_config(capsys):
    assert (
        gpu_sweep.main(
            ["--gpus", "0", "--dry-run", "+experiment=demo", "seed=0,1", "model.gamma_c=1,4"]
        )
        == 0
    )
    assert "4 jobs on GPUs ['0']" in capsys.readouterr().out
