"""The end of a tuning sweep: a trial table, the best parameters and the command that retrains them.

``TuneReport`` (a Hydra callback, set by ``conf/sweep/tune.yaml``) writes into the sweep folder:

- ``trials.csv``: one row per trial: job folder, status, swept values, the objective, every
  validation metric and, for the proxy study only, the test metrics each trial also computed;
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

log = logging.getLogger("cfa_lightning")

__all__ = ["TuneReport", "best_command", "read_trials", "spearman"]


def _override_value(value: Any) -> str:
    """A value as Hydra's override grammar reads it back (lists as ``[a,b]``)."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _parse_override(text: str) -> tuple[str, str] | None:
    if "=" not in text:
        return None
    key, value = text.split("=", 1)
    return key.lstrip("+~"), value


def read_trials(sweep_dir: str | Path, objective: str | None = None) -> list[dict[str, Any]]:
    """Every job folder's metrics.json as a flat row (sorted by job number)."""
    sweep_dir = Path(sweep_dir)
    rows = []
    for job_dir in sorted(p for p in sweep_dir.iterdir() if (p / "metrics.json").is_file()):
        result = json.loads((job_dir / "metrics.json").read_text())
        row: dict[str, Any] = {"job": job_dir.name, "status": result.get("status", "ok")}
        for override in result.get("overrides", []):
            parsed = _parse_override(override)
            if parsed and not parsed[0].startswith("hydra"):
                row[f"param:{parsed[0]}"] = parsed[1]
        val = result.get("val_metrics", {})
        row["objective"] = val.get(objective, result.get("metrics", {}).get(objective, math.nan))
        row.update(val)
        row.update(result.get("metrics", {}))
        row["train_time_s"] = result.get("train_time_s")
        rows.append(row)
    rows.sort(key=lambda r: int(r["job"].split("_", 1)[0]) if r["job"][0].isdigit() else 0)
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
    chosen = [f"{k}={_override_value(v)}" for k, v in best_params.items()]
    return " ".join(["python -m cfa_lightning.train", *map(shlex.quote, kept + chosen)])


def _ranks(values: list[float]) -> list[float]:
    """Average ranks (1-based), ties sharing the mean of their positions."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation of paired values (NaN pairs dropped; NaN if < 3 pairs)."""
    pairs = [(a, b) for a, b in zip(x, y, strict=True) if math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3:
        return math.nan
    rx, ry = _ranks([a for a, _ in pairs]), _ranks([b for _, b in pairs])
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx > 0 and sy > 0 else math.nan


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
