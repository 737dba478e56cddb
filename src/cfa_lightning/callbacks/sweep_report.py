"""A Hydra callback that reports, at the end of a multirun, which jobs failed."""

from __future__ import annotations

import atexit
import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ..utils import job_results

log = logging.getLogger("cfa_lightning")


def sweep_status(sweep_dir: str | Path) -> dict[str, Any]:
    """Every job folder of a sweep with its status: "ok", "failed" or "missing" (no metrics.json)."""
    jobs: dict[str, str] = {}
    errors: dict[str, str] = {}
    for job_dir, result in job_results(sweep_dir).items():
        jobs[job_dir.name] = "missing" if result is None else result["status"]
        if result and result.get("error"):
            errors[job_dir.name] = result["error"]
    failed = [name for name, status in jobs.items() if status != "ok"]
    return {
        "n_jobs": len(jobs),
        "n_failed": len(failed),
        "failed": failed,
        "errors": errors,
        "jobs": jobs,
    }


def write_sweep_status(sweep_dir: Path) -> None:
    """``sweep_status.json`` in the sweep folder, and a log line per failed job."""
    if not sweep_dir.is_dir():
        return
    status = sweep_status(sweep_dir)
    (sweep_dir / "sweep_status.json").write_text(json.dumps(status, indent=2) + "\n")
    if status["n_failed"]:
        why = {name: status["errors"].get(name, status["jobs"][name]) for name in status["failed"]}
        lines = "\n".join(f"  {name}: {reason}" for name, reason in why.items())
        log.error("%d of %d sweep jobs failed:\n%s", status["n_failed"], status["n_jobs"], lines)
    elif status["n_jobs"]:
        log.info("all %d sweep jobs finished; results in %s", status["n_jobs"], sweep_dir)


class SweepReport(Callback):
    """Writes ``sweep_status.json`` into the sweep folder and logs the failed jobs, if any.

    Jobs that fail in Python return NaN (``train.py``), so every launcher reaches the end of the
    multirun. A job that dies (killed worker, node lost, SLURM time limit) makes the Ray and
    submitit launchers raise instead; the report is then written when the launching process
    exits, with that job's folder as "missing" (no ``metrics.json``).
    """

    def __init__(self) -> None:
        self._pending: Path | None = None  # the sweep folder, until its report is written

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._pending = Path(config.hydra.sweep.dir)
        atexit.register(self._report_if_pending)

    def _report_if_pending(self) -> None:
        if self._pending is not None:
            report = self._pending / "sweep_status.json"
            log.error(
                "the sweep stopped before its end (see the error above); its job folders so far "
                "are in %s",
                report,
            )
            write_sweep_status(self._pending)
            self._pending = None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._pending = None
        write_sweep_status(Path(config.hydra.sweep.dir))
