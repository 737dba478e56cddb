"""The end of a tuning sweep: a trial table, the best parameters and the command that retrains them.

``TuneReport`` (a Hydra callback, set by ``conf/sweep/tune.yaml``) writes into the sweep folder:

- ``trials.csv``: one row per trial: job folder, status, swept values, the objective and every
  validation metric (test metrics only when the trials were asked to score the test set,
  ``test_after_fit=true``: the proxy study of ``experiments/tune_then_test.py --proxy``);
- ``best.json``: the sweeper's best parameters and value (``optimization_results.yaml``), the
  trial that reached it and the command below;
- ``best_command.txt``: ``python -m cfa_lightning.train`` with the sweep's own overrides (less
  the sweep) plus the best parameters: a single run that retrains the chosen configuration.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shlex
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .utils import job_results

log = logging.getLogger("cfa_lightning")

__all__ = ["TuneReport", "best_command", "override_value", "read_trials"]


def override_value(value: Any) -> str:
    """A value as Hydra's override grammar reads it back (lists as ``[a,b]``)."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _parse_override(text: str) -> tuple[str, str] | None:
    if "=" not in text:
        return None
    key, value = text.split("=", 1)
    return key.lstrip("+~"), value


def read_trials(sweep_dir: str | Path, objective: str | None = None) -> list[dict[str, Any]]:
    """Every trial's metrics.json as a flat row, in job order (trials that left none are skipped)."""
    rows = []
    for job_dir, result in job_results(sweep_dir).items():
        if result is None:
            continue
        row: dict[str, Any] = {"job": job_dir.name, "status": result["status"]}
        for override in result.get("overrides", []):
            parsed = _parse_override(override)
            if parsed and not parsed[0].startswith("hydra"):
                row[f"param:{parsed[0]}"] = parsed[1]
        val = result.get("val_metrics", {})
        row["objective"] = val.get(objective, result["metrics"].get(objective, math.nan))
        row.update(val)
        row.update(result["metrics"])
        row["train_time_s"] = result.get("train_time_s")
        rows.append(row)
    return rows


def write_table(rows: list[dict[str, Any]], path: Path) -> Path:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def best_command(task_overrides: list[str], best_params: dict[str, Any]) -> str:
    """The single-run command that retrains the best parameters with the sweep's other settings."""
    kept = []
    for override in task_overrides:
        parsed = _parse_override(override)
        key = parsed[0] if parsed else override
        if key == "sweep" or key.startswith("hydra") or key in best_params:
            continue
        kept.append(override)
    chosen = [f"{k}={override_value(v)}" for k, v in best_params.items()]
    return " ".join(["python -m cfa_lightning.train", *map(shlex.quote, kept + chosen)])


class TuneReport(Callback):
    """At the end of a tuning multirun: trials.csv, best.json and best_command.txt."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        objective = config.get("optimized_metric")
        rows = read_trials(sweep_dir, objective)
        table = write_table(rows, sweep_dir / "trials.csv") if rows else None
        results_file = sweep_dir / "optimization_results.yaml"
        if not results_file.is_file():
            log.warning("no optimization_results.yaml in %s: no best parameters", sweep_dir)
            return
        results = OmegaConf.to_container(OmegaConf.load(results_file), resolve=True)
        best_params = results.get("best_params", {})
        task = list(config.hydra.overrides.task)
        command = best_command(task, best_params)
        best_row = next(
            (r for r in rows if r["objective"] == results.get("best_value")), None
        )  # the trial that reached the best value
        payload = {
            "objective": objective,
            "best_value": results.get("best_value"),
            "best_params": best_params,
            "best_trial": best_row["job"] if best_row else None,
            "n_trials": len(rows),
            "command": command,
        }
        (sweep_dir / "best.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
        (sweep_dir / "best_command.txt").write_text(command + "\n")
        log.info(
            "best %s = %s with %s\n  trial table: %s\n  retrain it: %s",
            objective,
            results.get("best_value"),
            best_params,
            table,
            command,
        )
