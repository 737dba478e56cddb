"""run_folder.py: a failed eval, predict or export leaves no folder behind, and a folder that was
there before keeps what it held."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose

from cfa_lightning.run_folder import remove_hydra_files


def _run(cwd: Path, module: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"cfa_lightning.{module}", *overrides], cwd=cwd,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize(
    "module, overrides, error",
    [
        ("predict", ["input=x.png"], "give either ckpt_path="),  # sys.exit in the task
        ("predict", ["ckpt_path=${oops}", "input=x.png"], "key 'oops' not found"),  # raised
        pytest.param(
            "eval",
            ["ckpt_path=missing.ckpt", "logger=none"],
            "missing.ckpt",
            marks=pytest.mark.slow,
        ),  # 20 s of imports on 2 busy cores
        pytest.param("export", ["ckpt_path=missing.ckpt"], "missing.ckpt", marks=pytest.mark.slow),
    ],
    ids=["predict-exit", "predict-exception", "eval", "export"],
)
def test_a_failed_run_leaves_no_folder(tmp_path, module, overrides, error):
    proc = _run(tmp_path, module, *overrides)
    assert proc.returncode != 0 and error in proc.stderr, proc.stderr[-2000:]
    assert _tree(tmp_path) == []  # not even outputs/<task>/


@pytest.mark.parametrize("task", ["eval", "predict", "export"])
def test_every_command_but_train_has_the_callback(hydra_ctx, task):
    """train's failed jobs keep their folder: metrics.json says why (a sweep counts them)."""
    cfg = compose(task, return_hydra_config=True)
    assert cfg.hydra.callbacks.run_folder._target_ == "cfa_lightning.run_folder.RunFolder"


def test_output_dir_is_the_run_folder_and_what_was_there_stays(tmp_path):
    out = tmp_path / "given"
    proc = _run(tmp_path, "predict", "input=x.png", f"output_dir={out}")
    assert proc.returncode != 0 and _tree(tmp_path) == []  # created by the run: removed
    out.mkdir()
    (out / "mine.txt").write_text("a user's file")
    proc = _run(tmp_path, "predict", "input=x.png", f"output_dir={out}")
    assert proc.returncode != 0 and (out / "mine.txt").read_text() == "a user's file"
    assert (out / "predict.log").is_file()  # the log of the failed run stays beside it


@pytest.mark.parametrize(
    "module, given",
    [
        ("predict", "input=x.png"),
        pytest.param("export", "ckpt_path=missing.ckpt", marks=pytest.mark.slow),  # 20 s
    ],
)
def test_an_unwritable_output_dir_stops_with_one_line(tmp_path, module, given):
    """Hydra would make the run folder and fail with a traceback; the callback checks it first
    (a folder under a regular file cannot be made, even by root)."""
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "sub"
    proc = _run(tmp_path, module, given, f"output_dir={out}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip() == (
        f"error: output_dir='{out}' cannot be written (Not a directory); "
        "give a folder you can write: output_dir=<folder>"
    )
    assert _tree(tmp_path) == ["afile"]


def test_only_hydras_own_files_are_ever_removed(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (run / ".hydra" / name).write_text("")
    (run / "predict.log").write_text("")
    (run / "predictions.csv").write_text("path\n")
    assert not remove_hydra_files(run, "predict.log")  # it wrote something: all stays
    assert len(_tree(run)) == 6
    (run / "predictions.csv").unlink()
    (run / ".hydra" / "notes.txt").write_text("")
    assert not remove_hydra_files(run, "predict.log")  # a file Hydra does not write
    (run / ".hydra" / "notes.txt").unlink()
    assert remove_hydra_files(run, "predict.log") and _tree(run) == []
