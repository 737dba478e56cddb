"""Where the Hydra configs live, and the resolvers they use.

The configs ship inside the package (``cfa_lightning/conf``, also reached as ``conf/`` at the top
of a source checkout), so the commands find them from any folder after a plain ``pip install``.
Add a folder of your own with Hydra's ``--config-dir``; ``CFA_CONFIG_DIR`` replaces the whole tree.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from omegaconf import OmegaConf

from .sizes import config_input_size, model_input_size, trained_sizes

CONFIG_DIR = os.environ.get("CFA_CONFIG_DIR", str(Path(__file__).resolve().parent / "conf"))


def input_size(image_size, crop_size=None) -> list[int]:
    """The (H, W) the model sees, as a list for the configs (see sizes.model_input_size)."""
    return list(model_input_size(image_size, crop_size))


@functools.lru_cache(maxsize=4)
def _checkpoint_sizes(ckpt_path: str, stamp: int | None) -> tuple[list[int], list[int] | None]:
    from .checkpoint import load_checkpoint  # torch: only when a config asks

    ckpt = load_checkpoint(ckpt_path)
    data = ckpt.get("datamodule_hyper_parameters") or {}
    resize, crop = trained_sizes(data, (ckpt.get("hyper_parameters") or {}).get("input_size"))
    return list(resize), list(crop) if crop else None


def trained_size(ckpt_path: str, key: str) -> list[int] | None:
    """``image_size`` or ``crop_size`` of the data a checkpoint was trained on (for eval)."""
    stamp = os.stat(ckpt_path).st_mtime_ns if os.path.isfile(ckpt_path) else None
    resize, crop = _checkpoint_sizes(str(ckpt_path), stamp)
    return resize if key == "image_size" else crop


def _hydra_job():
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def is_multirun() -> bool:
    """True inside a job of a Hydra multirun (``-m``)."""
    from hydra.types import RunMode

    hydra_cfg = _hydra_job()
    return hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN


def sweep_group() -> str | None:
    """The W&B group of a sweep's jobs: the multirun folder (any launcher); None outside a sweep."""
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


def folder_name(text: str) -> str:
    """``text`` as one folder name: a swept config group (``model/bank=coreset``) keeps its
    value, and its slash becomes a dot instead of a subfolder."""
    return str(text).replace("/", ".")


def tasks_per_node(devices) -> int:
    """SLURM tasks per node for Lightning's SLURM environment: one DDP rank per device."""
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(
            f"trainer.devices={devices!r}: a SLURM job needs a number of devices per node "
            "(one task each); set e.g. trainer.devices=4"
        )
    return devices


def gpus_per_node(accelerator: str, devices) -> int:
    """GPUs to reserve on each node: none for a CPU trainer, else one per task."""
    return 0 if accelerator == "cpu" else tasks_per_node(devices)


def ray_gpus_per_job(address: str | None) -> int:
    """One GPU per Ray job on a cluster or a machine with GPUs; none on a CPU-only machine."""
    if address:  # the cluster's nodes, not this one, have the GPUs
        return 1
    import torch

    return 1 if torch.cuda.is_available() else 0


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("cfa_input_size"):
        OmegaConf.register_new_resolver("cfa_input_size", config_input_size)
    if not OmegaConf.has_resolver("cfa_sweep_group"):
        OmegaConf.register_new_resolver("cfa_sweep_group", sweep_group)
    if not OmegaConf.has_resolver("cfa_job_name"):
        OmegaConf.register_new_resolver("cfa_job_name", job_name)
    for name, resolver in (("cfa_trained_size", trained_size),
                           ("cfa_folder_name", folder_name),
                           ("cfa_tasks_per_node", tasks_per_node),
                           ("cfa_gpus_per_node", gpus_per_node),
                           ("cfa_ray_gpus_per_job", ray_gpus_per_job)):  # fmt: skip
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


register_resolvers()
