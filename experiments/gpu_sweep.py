"""Run a Hydra sweep with one job per GPU at a time (Hydra's basic launcher runs jobs one by one).

    python experiments/gpu_sweep.py --gpus 0,1,2,3 -- +experiment=wide_resnet50 +sweep=categories

The arguments after ``--`` are what you would give ``python -m cfa_lightning.train -m``: sweeps
in a ``+sweep=`` config (``hydra.sweeper.params``) and on the command line (``seed=0,1,2``;
the command line wins for a key given in both), expanded in the basic sweeper's order. Each job
is an ordinary single run, ``python -m cfa_lightning.train <its overrides>``, with
``CUDA_VISIBLE_DEVICES`` set to its GPU and its output folder
``<sweep dir>/<job number>_<swept values>_seed<seed>`` (the names a multirun gives). A GPU takes
the next job as soon as its current one ends. List a GPU twice (``--gpus 0,0,1,1``) to run two
jobs on it at once. ``CFA_SWEEP_GROUP`` is set for every job, so W&B runs share a group.

A failing job does not stop the others: its exit code and log (``<sweep dir>/logs/``) are
reported at the end, its ``metrics.json`` says ``"status": "failed"``, and the script exits 1.
``--dry-run`` prints the jobs and stops.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Job:
    """One run of the sweep: its number and its Hydra overrides."""

    num: int
    overrides: list[str]


@dataclass
class JobResult:
    job: Job
    gpu: str
    returncode: int
    start: float
    end: float
    log: Path | None = None
    extra: dict = field(default_factory=dict)


def expand_overrides(
    overrides: Sequence[str], sweeper_params: dict[str, str] | None = None
) -> list[list[str]]:
    """The job list of a multirun: every combination of the sweeps, the last key varying fastest.

    ``sweeper_params`` (from ``hydra.sweeper.params``) come first; a command-line override of the
    same key replaces them, as with Hydra's basic sweeper.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    params = dict(sweeper_params or {})
    given = [f"{key}={value}" for key, value in params.items()] + list(overrides)
    choices: dict[str, list[str]] = {}
    for override in parser.parse_overrides(given):
        key = override.get_key_element()
        if override.is_sweep_override():
            values = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            values = [override.input_line]
        choices.pop(key, None)  # a later (command-line) value of a key replaces the earlier one
        choices[key] = values
    return [list(combination) for combination in itertools.product(*choices.values())]


def compose_sweep(
    overrides: Sequence[str], config_name: str = "train"
) -> tuple[dict[str, str], str]:
    """``hydra.sweeper.params`` and the resolved ``hydra.sweep.dir`` of the composed config."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from cfa_lightning.config import CONFIG_DIR

    single = []  # compose() takes no sweeps: the first value of each stands in for the others
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if override.is_sweep_override():
            first = next(iter(override.sweep_string_iterator()))
            single.append(f"{override.get_key_element()}={first}")
        else:
            single.append(override.input_line)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name, overrides=single, return_hydra_config=True)
    GlobalHydra.instance().clear()
    params = cfg.hydra.sweeper.params
    params = OmegaConf.to_container(params, resolve=False) if params else {}
    return {str(k): str(v) for k, v in params.items()}, str(cfg.hydra.sweep.dir)


def job_command(job: Job, sweep_dir: Path, module: str = "cfa_lightning.train") -> list[str]:
    """A single run whose output folder is named like a multirun job's."""
    run_dir = f"{sweep_dir}/{job.num}_${{hydra.job.override_dirname}}_seed${{seed}}"
    return [sys.executable, "-m", module, *job.overrides, f"hydra.run.dir={run_dir}"]


def run_on_gpus(
    jobs: Sequence[Job],
    gpus: Sequence[str],
    command: Callable[[Job], list[str]],
    log_dir: Path | None = None,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
) -> list[JobResult]:
    """Run the jobs with at most one at a time per GPU slot; a GPU takes the next job when free."""
    if not gpus:
        raise ValueError("no GPU given: pass --gpus, e.g. --gpus 0,1")
    pending: queue.Queue[Job] = queue.Queue()
    for job in jobs:
        pending.put(job)
    results: list[JobResult] = []
    lock = threading.Lock()

    def worker(gpu: str) -> None:
        while True:
            try:
                job = pending.get_nowait()
            except queue.Empty:
                return
            log = log_dir / f"job_{job.num}.log" if log_dir is not None else None
            job_env = {**os.environ, **(env or {}), "CUDA_VISIBLE_DEVICES": gpu}
            start = time.time()
            with open(log, "w") if log else open(os.devnull, "w") as out:
                proc = subprocess.run(
                    command(job), cwd=cwd, env=job_env, stdout=out, stderr=subprocess.STDOUT
                )
            result = JobResult(job, gpu, proc.returncode, start, time.time(), log)
            with lock:
                results.append(result)
                status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                print(f"[gpu {gpu}] job {job.num} {status} in {result.end - start:.0f} s: "
                      f"{' '.join(job.overrides)}", flush=True)  # fmt: skip

    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
    threads = [threading.Thread(target=worker, args=(gpu,), daemon=True) for gpu in gpus]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(results, key=lambda r: r.job.num)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        usage="%(prog)s --gpus 0,1 [--sweep-dir DIR] [--dry-run] -- OVERRIDES...",
    )
    parser.add_argument("--gpus", default=os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                        help="comma-separated GPU ids, one job at a time on each (default: "
                             "$CUDA_VISIBLE_DEVICES)")  # fmt: skip
    parser.add_argument("--sweep-dir", type=Path, help="default: the config's hydra.sweep.dir")
    parser.add_argument("--module", default="cfa_lightning.train")
    parser.add_argument("--dry-run", action="store_true", help="print the jobs, run nothing")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    params, default_dir = compose_sweep(args.overrides)
    sweep_dir = (args.sweep_dir or Path(default_dir)).resolve()
    jobs = [Job(i, o) for i, o in enumerate(expand_overrides(args.overrides, params))]
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    print(f"{len(jobs)} jobs on GPUs {gpus or '(none given)'}; output: {sweep_dir}")
    if args.dry_run:
        for job in jobs:
            print(f"  {job.num}: {' '.join(job.overrides)}")
        return 0

    group = "_".join(sweep_dir.parts[-2:])
    results = run_on_gpus(
        jobs, gpus, lambda job: job_command(job, sweep_dir, args.module),
        log_dir=sweep_dir / "logs", env={"CFA_SWEEP_GROUP": group},
    )  # fmt: skip
    failed = [r for r in results if r.returncode != 0]
    status = {
        "n_jobs": len(results),
        "n_failed": len(failed),
        "jobs": [{"num": r.job.num, "overrides": r.job.overrides, "gpu": r.gpu,
                  "returncode": r.returncode, "seconds": round(r.end - r.start, 1),
                  "log": str(r.log)} for r in results],
    }  # fmt: skip
    (sweep_dir / "sweep_status.json").write_text(json.dumps(status, indent=2) + "\n")
    gpu_hours = sum(r.end - r.start for r in results) / 3600
    print(
        f"{len(results) - len(failed)} of {len(results)} jobs finished ({gpu_hours:.2f} GPU-hours)"
    )
    for r in failed:
        print(
            f"  FAILED job {r.job.num} (exit {r.returncode}, log {r.log}): {' '.join(r.job.overrides)}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
