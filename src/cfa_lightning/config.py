"""Where the Hydra configs live, and the resolvers they use."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

CONFIG_DIR = os.environ.get("CFA_CONFIG_DIR", str(Path(__file__).resolve().parents[2] / "conf"))


def input_size(image_size, crop_size=None) -> list[int]:
    """The (H, W) the model sees: the crop if one is set, else the resize target."""
    size = crop_size if crop_size is not None else image_size
    if isinstance(size, int):
        return [size, size]
    return [int(v) for v in size]


SWEEP_GROUP_ENV = "CFA_SWEEP_GROUP"  # set by experiments/gpu_sweep.py for the jobs it launches


def _hydra_job():
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def is_multirun() -> bool:
    """True inside a job of a Hydra multirun (``-m``)."""
    from hydra.types import RunMode

    hydra_cfg = _hydra_job()
    return hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN


def sweep_group() -> str | None:
    """The W&B group of a sweep's jobs: the launcher's name, or the multirun folder; else None."""
    if os.environ.get(SWEEP_GROUP_ENV):
        return os.environ[SWEEP_GROUP_ENV]
    hydra_cfg = _hydra_job()
    if hydra_cfg is None or not is_multirun():
        return None
    return "_".join(Path(hydra_cfg.sweep.dir).parts[-2:])  # e.g. train_categories_<time>


def job_name(default: str) -> str:
    """A sweep job's name is its output folder (job number and swept values); else ``default``."""
    hydra_cfg = _hydra_job()
    if hydra_cfg is None or sweep_group() is None:
        return default
    return Path(hydra_cfg.runtime.output_dir).name


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("cfa_input_size"):
        OmegaConf.register_new_resolver("cfa_input_size", input_size)
    if not OmegaConf.has_resolver("cfa_sweep_group"):
        OmegaConf.register_new_resolver("cfa_sweep_group", sweep_group)
    if not OmegaConf.has_resolver("cfa_job_name"):
        OmegaConf.register_new_resolver("cfa_job_name", job_name)


register_resolvers()
