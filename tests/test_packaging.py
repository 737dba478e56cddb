"""The built package: a clean wheel and sdist, and commands that run from outside the checkout."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPTS = ("cfa-train", "cfa-eval", "cfa-predict", "cfa-export")


def _run(cmd: list, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CFA_CONFIG_DIR")}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env={**clean, "WANDB_MODE": "offline", **(env or {})})  # fmt: skip
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """`python -m build`: the sdist, then the wheel built from it (no build isolation: offline)."""
    out = tmp_path_factory.mktemp("dist")
    env = {"PYTHONDONTWRITEBYTECODE": ""}  # else setuptools warns that it cannot byte-compile
    proc = _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT], ROOT, env)
    log = proc.stdout + proc.stderr
    assert "warning" not in log.lower(), [ln for ln in log.splitlines() if "warn" in ln.lower()]
    return out


@pytest.mark.slow
def test_sdist_and_wheel_hold_the_configs_and_the_console_scripts(dist):
    (sdist,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")
    with tarfile.open(sdist) as tar:
        in_sdist = {Path(*Path(n).parts[1:]).as_posix() for n in tar.getnames()}
    names = set(zipfile.ZipFile(wheel).namelist())
    src = ROOT / "src"
    conf = sorted(
        p.relative_to(src).as_posix() for p in (src / "cfa_lightning/conf").rglob("*.yaml")
    )
    assert len(conf) > 30 and "cfa_lightning/conf/hydra/launcher/slurm.yaml" in conf
    assert set(conf) <= names and {f"src/{c}" for c in conf} <= in_sdist
    (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert all(f"{script} = cfa_lightning." in text for script in CONSOLE_SCRIPTS)


@pytest.mark.slow
def test_the_installed_wheel_trains_and_predicts_from_any_folder(dist, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], tmp_path)
    py, bin_dir = venv / "bin" / "python", venv / "bin"
    _run([py, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", next(dist.glob("*.whl"))],
         tmp_path)  # fmt: skip
    # The dependencies (torch & co, gigabytes) come from the project's environment, added after
    # the install so that pip saw an empty environment: the package itself is the wheel's.
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     tmp_path).stdout.strip())  # fmt: skip
    (site / "project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where = _run([py, "-c", "import cfa_lightning; print(cfa_lightning.__file__)"], tmp_path).stdout
    assert where.startswith(str(site)), where
    assert all((bin_dir / script).is_file() for script in CONSOLE_SCRIPTS)

    work = tmp_path / "elsewhere"  # a folder outside the checkout, with no conf/ in it
    work.mkdir()
    small = ["data.n_train=12", "data.n_test_good=4", "data.n_test_defect=4",
             "data.generate_size=[96,96]", "data.image_size=96",
             "data.val_fraction=0.34"]  # 4 of the 12 validate: the validated default  # fmt: skip
    _run([bin_dir / "cfa-train", "+experiment=demo", "trainer.max_epochs=1", *small,
          "data.root=data", "hydra.run.dir=run"], work)  # fmt: skip
    assert (work / "run" / "metrics.json").is_file()
    ckpt = work / "run" / "checkpoints" / "last.ckpt"
    _run([py, "-m", "cfa_lightning.predict", f"ckpt_path={ckpt}", "input=data/synthetic/test",
          "recursive=true", "output_dir=predictions", "hydra.run.dir=predict_run"], work)  # fmt: skip
    with open(work / "predictions" / "predictions.csv") as f:
        assert len(list(csv.DictReader(f))) == 4 + 2 * 4  # every test image scored

    # a config folder of the user's own, beside the packaged ones
    (work / "my_conf" / "experiment").mkdir(parents=True)
    (work / "my_conf" / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - demo\nseed: 7\n"
    )
    job = _run([bin_dir / "cfa-train", "--config-dir", "my_conf", "+experiment=mine", "--cfg", "job"],
               work).stdout  # fmt: skip
    assert "seed: 7" in job and "tf_efficientnet_lite0" in job


def test_the_base_and_the_deploy_extra_need_no_torch():
    """`pip install 'cfa-lightning[deploy]'` stays torch-free; training asks for [train]."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    torch_stack = ("torch", "torchvision", "pytorch-lightning", "torchmetrics", "timm")

    def names(reqs: list[str]) -> set[str]:
        return {req.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip() for req in reqs}

    deploy = names(project["dependencies"] + extras["deploy"] + extras["openvino"])
    assert not deploy & set(torch_stack), deploy
    assert {"numpy", "pillow", "onnxruntime", "openvino", "hydra-core"} <= deploy
    assert set(torch_stack) <= names(extras["train"])
    assert "cfa-lightning[train,export,deploy,openvino,int8]" in extras["test"]
