"""The GPU check: device and versions, fast-vs-naive cells, a bf16 demo beside fp32, a 2-job sweep.

Self-contained for a bare GPU machine that has torch, timm and Lightning but not Hydra: with
`--wheels DIR` it first installs the wheels of DIR (hydra-core, omegaconf, antlr4, submitit, its
Hydra launcher, the lite0 weights) into /tmp/site without network, then runs every step with
`PYTHONPATH=/tmp/site:<checkout>/src`. Every step is a subprocess with a timeout; a failing step
is reported and the others still run. Results: `gpu_check.md` (the report) and the logs under
`--out`.

    python experiments/gpu_check.py --out /tmp/gpu --wheels .gpu/wheels    # on the GPU machine
    python experiments/gpu_check.py --out /tmp/gpu --small                 # CPU, small sizes

Steps:
1. device and versions;
2. `experiments/benchmark.py` cells for lite0 and wide_resnet50_2 at 256 px, batch 32, fp32 and
   bf16-mixed, fast against naive;
3. the demo (`+experiment=demo`, synthetic data, real lite0 weights) trained in bf16-mixed, its
   test metrics beside the same checkpoint scored in fp32 (`cfa_lightning.eval`,
   trainer.precision=32-true);
4. a 2-job sweep (seed=0,1) through `hydra/launcher=local_submitit`, with each job's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE = Path("/tmp/site")
# Small sizes for a CPU run (tests/test_gpu_check.py): the same steps, seconds each.
# Seconds per step on the GPU machine: together under the device tool's 600 s per command.
TIMEOUTS = {"bench": 240, "demo": 150, "fp32": 60, "sweep": 140}
SMALL_DATA = ["data.n_train=40", "data.n_test_good=4", "data.n_test_defect=4",
              "data.generate_size=[64,64]", "data.image_size=64", "trainer.max_epochs=1"]  # fmt: skip


def install_wheels(wheels: Path) -> None:
    """pip install --no-index the wheels of `wheels` into /tmp/site (no network needed)."""
    files = sorted(str(f) for f in wheels.glob("*.whl"))
    if not files:
        sys.exit(f"error: --wheels {wheels}: no .whl files there")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--no-compile", "--target", str(SITE), *files], check=True)  # fmt: skip


def environment(with_site: bool) -> dict[str, str]:
    paths = ([str(SITE)] if with_site else []) + [str(ROOT / "src")]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1",
            "WANDB_MODE": "disabled"}  # fmt: skip


class Report:
    """Collects the sections of gpu_check.md and prints each as it comes."""

    def __init__(self, out: Path) -> None:
        self.out, self.lines = out, []

    def add(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)
        (self.out / "gpu_check.md").write_text("\n".join(self.lines) + "\n")

    def step(self, name: str, command: list[str], env: dict, timeout: float, log: str,
             accept: tuple[int, ...] = (0,)):  # fmt: skip
        """Run one step as a subprocess; its output goes to `log`. Returns (ok, seconds): ok when
        its exit status is in `accept`."""
        start = time.perf_counter()
        with open(self.out / log, "w") as f:
            f.write("$ " + shlex.join(command) + "\n")
            f.flush()
            try:
                proc = subprocess.run(command, cwd=ROOT, env=env, stdout=f,
                                      stderr=subprocess.STDOUT, timeout=timeout)  # fmt: skip
                ok = proc.returncode in accept
                why = f"exit {proc.returncode}"
            except subprocess.TimeoutExpired:
                ok, why = False, f"timed out after {timeout:.0f} s"
        seconds = time.perf_counter() - start
        if not ok:
            tail = (self.out / log).read_text().strip().splitlines()[-3:]
            self.add(f"**{name} failed** ({why}, {seconds:.0f} s; log {log}):")
            self.add("```\n" + "\n".join(tail) + "\n```")
        return ok, seconds


def versions(env: dict) -> str:
    code = (
        "import torch, timm, pytorch_lightning as pl, platform\n"
        "mods = {'torch': torch, 'timm': timm, 'pytorch_lightning': pl}\n"
        "for name in ('hydra', 'omegaconf', 'submitit', 'torchmetrics', 'onnxruntime'):\n"
        "    try:\n"
        "        mods[name] = __import__(name)\n"
        "    except ImportError:\n"
        "        mods[name] = None\n"
        "print('python', platform.python_version(), '|', ' | '.join(\n"
        '    f\'{k} {getattr(m, "__version__", "?") if m else "missing"}\' for k, m in mods.items()))\n'
        "if torch.cuda.is_available():\n"
        "    p = torch.cuda.get_device_properties(0)\n"
        "    print(f'GPU {p.name}, {p.total_memory / 2**30:.0f} GiB, compute {p.major}.{p.minor}, '\n"
        "          f'CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}')\n"
        "else:\n"
        "    print('no CUDA device: CPU', platform.processor() or platform.machine())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return (proc.stdout + proc.stderr).strip()


def metrics_of(path: Path) -> dict[str, float]:
    return json.loads(path.read_text()).get("metrics", {}) if path.is_file() else {}


def sweep_jobs(sweep: Path) -> list[tuple[str, float]]:
    """(submitit job id, wall s from its submission to its result) for every finished job."""
    jobs = []
    for folder in sorted((sweep / ".submitit").glob("*")):
        submitted, results = list(folder.glob("*_submitted.pkl")), list(folder.glob("*_result.pkl"))
        if submitted and results:
            jobs.append((folder.name, results[0].stat().st_mtime - submitted[0].stat().st_mtime))
    return jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT", "outputs/gpu_check"))
    )
    parser.add_argument("--wheels", type=Path, help="install these wheels into /tmp/site first")
    parser.add_argument("--small", action="store_true", help="small sizes (a CPU test)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["bench", "demo", "sweep"])
    parser.add_argument("--timeout-scale", type=float, help="x the step timeouts (small: 8)")
    args = parser.parse_args(argv)
    scale = args.timeout_scale or (8.0 if args.small else 1.0)  # a shared CPU is slow
    timeout = {step: seconds * scale for step, seconds in TIMEOUTS.items()}
    args.out = args.out.resolve()  # the steps run from the checkout's root
    args.out.mkdir(parents=True, exist_ok=True)
    if args.wheels:
        install_wheels(args.wheels)
    env = environment(with_site=args.wheels is not None or SITE.is_dir())
    report = Report(args.out)
    failures = 0

    # 1. device and versions
    report.add(f"# GPU check ({'small sizes' if args.small else 'full sizes'}), {time.ctime()}")
    report.add(f"host {platform.node()}, {os.cpu_count()} CPU threads")
    info = versions(env)
    report.add(info)
    cuda = "GPU " in info
    accelerator, device = ("gpu", "cuda") if cuda else ("cpu", "cpu")

    # 2. fast vs naive cells
    if "bench" not in args.skip:
        bench = [sys.executable, "experiments/benchmark.py", "--device", device,
                 "--backbones", "tf_efficientnet_lite0", "wide_resnet50_2",
                 "--precision", "32", "bf16-mixed", "--json", str(args.out / "bench.json")]  # fmt: skip
        bench += ["--size", "32", "--batch", "1", "--rounds", "1"] if args.small else [
            "--size", "256", "--batch", "32", "--rounds", "3"]  # fmt: skip
        report.add("\n## fast vs naive (experiments/benchmark.py)\n")
        # Exit 1 with every cell measured is a finding (a cell outside the exactness tolerance,
        # printed in the table), not a failed step; a cell that raised is a failure.
        ok, seconds = report.step("benchmark", bench, env, timeout["bench"], "bench.log", (0, 1))
        written = args.out / "bench.json"
        cells = json.loads(written.read_text()) if ok and written.is_file() else []
        errors = [c for c in cells if "error" in c]
        if errors:
            report.add(f"**benchmark failed**: {len(errors)} cell(s) raised: {errors[0]['error']}")
        ok = ok and bool(cells) and not errors
        failures += not ok
        if ok:
            table = [ln for ln in (args.out / "bench.log").read_text().splitlines()
                     if ln.startswith(("|", "#", "fast vs naive"))]  # fmt: skip
            report.add("\n".join(table) + f"\n\n({seconds:.0f} s)")

    data = SMALL_DATA if args.small else []
    # +protocol=last_epoch: the tested model is checkpoints/last.ckpt, the one scored in fp32
    demo = ["+experiment=demo", "+protocol=last_epoch", f"data.root={args.out / 'data'}", *data,
            f"trainer.accelerator={accelerator}", "logger=csv"]  # fmt: skip

    # 3. demo in bf16-mixed, its test metrics beside the same checkpoint scored in fp32
    if "demo" not in args.skip:
        report.add("\n## demo trained in bf16-mixed, tested in bf16-mixed and in fp32\n")
        run_dir, fp32_dir = args.out / "demo_bf16", args.out / "demo_fp32"
        train = [sys.executable, "-m", "cfa_lightning.train", *demo, "trainer.precision=bf16-mixed",
                 f"hydra.run.dir={run_dir}"]  # fmt: skip
        ok, train_s = report.step(
            "bf16-mixed demo training", train, env, timeout["demo"], "demo_bf16.log"
        )
        failures += not ok
        if ok:
            ckpt = run_dir / "checkpoints" / "last.ckpt"
            score = [sys.executable, "-m", "cfa_lightning.eval", f"ckpt_path={ckpt}", "data=synthetic",
                     *demo[2:-1], "trainer.precision=32-true", f"hydra.run.dir={fp32_dir}"]  # fmt: skip
            ok, eval_s = report.step("fp32 scoring", score, env, timeout["fp32"], "demo_fp32.log")
            failures += not ok
            bf16, fp32 = metrics_of(run_dir / "metrics.json"), metrics_of(fp32_dir / "metrics.json")
            report.add(f"training + test {train_s:.0f} s, fp32 scoring {eval_s:.0f} s\n")
            report.add("| metric | bf16-mixed | fp32 | difference |\n|---|---|---|---|")
            for key, value in bf16.items():
                other = fp32.get(key, float("nan"))
                report.add(f"| {key} | {value:.6f} | {other:.6f} | {value - other:+.2e} |")

    # 4. a 2-job sweep through the local submitit launcher
    if "sweep" not in args.skip:
        report.add("\n## 2-job sweep, hydra/launcher=local_submitit (seed=0,1)\n")
        sweep = args.out / "sweep"
        gpus = ["hydra.launcher.gpus_per_node=1"] if cuda else []  # 0 hides the GPU from the jobs
        command = [sys.executable, "-m", "cfa_lightning.train", "-m", "hydra/launcher=local_submitit",
                   *gpus, *demo[:-1], "logger=none", "seed=0,1",
                   f"hydra.sweep.dir={sweep}"]  # fmt: skip
        ok, seconds = report.step("sweep", command, env, timeout["sweep"], "sweep.log")
        failures += not ok
        jobs = sweep_jobs(sweep)
        report.add(f"whole sweep {seconds:.0f} s (the 2 jobs run at the same time)\n")
        report.add("| submitit job | wall s (submitted -> result) |\n|---|---|")
        for job, wall in jobs:
            report.add(f"| {job} | {wall:.1f} |")
        report.add("\n| job folder | status | train_time_s (fit only) |\n|---|---|---|")
        for path in sorted(sweep.glob("*/metrics.json")):
            result = json.loads(path.read_text())
            report.add(f"| {path.parent.name} | {result.get('status')} | "
                       f"{result.get('train_time_s', '-')} |")  # fmt: skip
        if len(jobs) != 2:
            report.add(f"**sweep: expected 2 finished jobs, found {len(jobs)}**")
            failures += 1

    report.add(f"\n{failures} step(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
