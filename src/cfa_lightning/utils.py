"""Small helpers shared by the entry points: instantiating lists, results files, closing loggers.

``metrics.json`` is written by ``write_metrics`` and read by ``read_metrics`` / ``job_results``
only (the tuning report, the sweep status and ``experiments/aggregate.py`` all go through them).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger("cfa_lightning")

METRICS_FILE = "metrics.json"


def instantiate_dict(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every entry with a `_target_` of a config group like `callbacks` or `logger`."""
    if not cfg:
        return []
    return [
        instantiate(node)
        for node in cfg.values()
        if isinstance(node, DictConfig) and "_target_" in node
    ]


def output_dir() -> Path:
    """The Hydra job's output directory (the cwd when Hydra is not running)."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path.cwd()


def writable_folder(folder: str | Path, option: str = "output_dir") -> Path:
    """``folder``, created if missing, once a file can be written in it (checked before the work
    that fills it); else a one-line ValueError that names the option."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()  # a file can be made, then it is gone
    except OSError as err:
        raise ValueError(
            f"{option}={str(folder)!r} cannot be written ({err.strerror or type(err).__name__}); "
            f"give a folder you can write: {option}=<folder>"
        ) from None
    return folder


def write_metrics(path: Path, metrics: dict[str, float], **info: Any) -> Path:
    """metrics.json: the final test metrics plus the protocol needed to read them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"metrics": metrics, **info}
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    return path


def read_metrics(job_dir: str | Path) -> dict[str, Any] | None:
    """A job folder's metrics.json, with ``status`` ("ok" unless it says otherwise) and
    ``metrics`` always present; None when the job left no such file."""
    path = Path(job_dir) / METRICS_FILE
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete it or rerun that job") from None
    result.setdefault("status", "ok")
    result.setdefault("metrics", {})
    return result


def _job_order(job_dir: Path) -> tuple[int, str]:
    """Hydra's job folders start with the job number: 2_x before 10_x."""
    number = job_dir.name.split("_", 1)[0]
    return (int(number) if number.isdigit() else -1, str(job_dir))


def job_results(root: str | Path, recursive: bool = False) -> dict[Path, dict[str, Any] | None]:
    """The job folders of a sweep with their metrics.json, in job order.

    ``recursive=False``: every visible sub-folder of ``root``, None for a job that left no
    metrics.json (it died outside Python). ``recursive=True``: every folder under ``root``
    holding a metrics.json (several sweeps, or a single run's folder).
    """
    root = Path(root)
    if recursive:
        folders = [p.parent for p in root.rglob(METRICS_FILE)]
    else:
        folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return {folder: read_metrics(folder) for folder in sorted(folders, key=_job_order)}


def job_info(cfg: DictConfig) -> dict[str, Any]:
    """What a results table needs to place a job: its values, protocol and Hydra overrides."""
    info: dict[str, Any] = {
        "seed": cfg.seed,
        "backbone": cfg.backbone.name,
        "taps": plain(cfg.backbone.get("out_indices")),
        "category": cfg.data.category,
        "image_size": plain(cfg.data.image_size),
        "crop_size": plain(cfg.data.crop_size),
        "max_epochs": cfg.trainer.get("max_epochs"),
        "gamma_c": cfg.model.gamma_c,
        "bank": plain(cfg.model.get("bank")),
        "gamma_d": cfg.model.gamma_d,
        "radius_init": cfg.model.radius,
        "K": cfg.model.K,
        "J": cfg.model.J,
        "alpha": cfg.model.alpha,
        "job": output_dir().name,
    }
    if HydraConfig.initialized():
        info["overrides"] = list(HydraConfig.get().overrides.task)
    return info


def format_table(metrics: dict[str, float], title: str) -> str:
    width = max((len(k) for k in metrics), default=10)
    lines = [title, "-" * (width + 12)]
    lines += [f"{k:<{width}}  {v:>8.4f}" for k, v in sorted(metrics.items())]
    return "\n".join(lines)


@contextmanager
def closing_loggers(loggers: list[Any]) -> Iterator[None]:
    """Finish W&B runs at the end of every job, also when the job fails (so sweeps go on).

    A failed job's run is finished with exit code 1, so W&B marks it failed.
    """
    exit_code = 0
    try:
        yield
    except BaseException:
        exit_code = 1
        raise
    finally:
        from pytorch_lightning.loggers import WandbLogger  # here: results readers need no Lightning

        for logger in loggers:
            experiment_finish = getattr(getattr(logger, "_experiment", None), "finish", None)
            if callable(experiment_finish):
                try:
                    experiment_finish(exit_code=exit_code)
                except Exception as err:  # a logger failing to close must not hide the job's error
                    log.warning("could not close logger %s: %s", type(logger).__name__, err)
        if any(isinstance(logger, WandbLogger) and logger._experiment for logger in loggers):
            import wandb

            # Stop W&B's service with the job: a Ray worker leaves right after its job, and W&B's
            # own teardown at interpreter exit would then find the service gone (a traceback).
            wandb.teardown()


def plain(cfg: Any) -> Any:
    """OmegaConf containers, also inside dicts, lists and tuples -> plain Python containers."""
    if isinstance(cfg, DictConfig | ListConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, Mapping):
        return {key: plain(value) for key, value in cfg.items()}
    if type(cfg) in (list, tuple):
        return type(cfg)(plain(value) for value in cfg)
    return cfg
