"""One folder per run of eval, predict and export, and none for a run that wrote nothing.

A Hydra callback (``hydra.callbacks.run_folder`` in conf/eval.yaml, predict.yaml, export.yaml):

- ``output_dir=`` given on the command line (predict, export): the run folder is that folder, so
  the outputs, the log and ``.hydra/`` are in one place (an explicit ``hydra.run.dir=`` wins);
  one that cannot be written stops the run with one line, before Hydra tries to create it;
- at exit, a run folder holding nothing but what Hydra wrote (``.hydra/`` and the job's log) is
  removed, with the empty folders above it that the run created: a run that failed before
  writing anything leaves no empty timestamped folder.

No torch here: ``cfa-predict model_dir=`` runs with the ``deploy`` extra only.
"""

from __future__ import annotations

import atexit
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write

from .utils import writable_folder

HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")


def only_hydra_files(folder: Path, log_name: str) -> bool:
    """Whether ``folder`` holds nothing but Hydra's ``.hydra/`` files and the job's log."""

    def hydras(entry: Path) -> bool:
        if entry.name == log_name:
            return entry.is_file()
        return (
            entry.name == ".hydra"
            and entry.is_dir()
            and all(f.name in HYDRA_FILES and f.is_file() for f in entry.iterdir())
        )

    return all(hydras(entry) for entry in folder.iterdir())


def remove_hydra_files(folder: Path, log_name: str) -> bool:
    """Remove Hydra's files from a run folder that holds nothing else; True if it did."""
    if not folder.is_dir() or not only_hydra_files(folder, log_name):
        return False
    try:
        for name in HYDRA_FILES:
            (folder / ".hydra" / name).unlink(missing_ok=True)
        if (folder / ".hydra").is_dir():
            (folder / ".hydra").rmdir()
        (folder / log_name).unlink(missing_ok=True)  # still open by logging: fine on POSIX
    except OSError:  # a file in use (Windows) or written meanwhile: leave the rest
        return False
    return True


class RunFolder(Callback):
    """``output_dir=`` is the run folder; a run folder left with only Hydra's files is removed,
    with the empty folders above it that the run created (``outputs/predict/`` on a first run)."""

    def __init__(self) -> None:
        self.created: Path | None = None  # the outermost folder the run creates; None: it exists

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        given = "output_dir" in config and not OmegaConf.is_interpolation(config, "output_dir")
        explicit = any(o.startswith("hydra.run.dir=") for o in config.hydra.overrides.hydra)
        redirect = given and config.output_dir is not None and not explicit
        if redirect:
            with read_write(config.hydra.run):
                config.hydra.run.dir = str(config.output_dir)
        run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir"))).absolute()  # ${now:} cached
        missing = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
        self.created = missing[-1] if missing else None
        if redirect:  # else Hydra's folder-making traceback; SystemExit: Hydra warns of the rest
            try:
                writable_folder(config.output_dir, "output_dir")
            except ValueError as err:
                raise SystemExit(f"error: {err}") from None

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.runtime.output_dir)
        # at exit, not at job end: a job that stops with sys.exit never reaches on_job_end
        atexit.register(self.clean, folder, f"{config.hydra.job.name}.log")

    def clean(self, folder: Path, log_name: str) -> None:
        if not remove_hydra_files(folder, log_name) or self.created is None:
            return  # a folder that was there before the run stays
        for path in (folder, *folder.parents):
            try:
                path.rmdir()  # only if empty
            except OSError:
                return
            if path == self.created:
                return
