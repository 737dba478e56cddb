"""Where the Hydra configs live, the resolvers they use, and the checks of a composed config.

The configs ship inside the package (``cfa_lightning/conf``, also reached as ``conf/`` at the top
of a source checkout), so the commands find them from any folder after a plain ``pip install``.
Add a folder of your own with Hydra's ``--config-dir``; ``CFA_CONFIG_DIR`` replaces the whole tree.

``ConfigCheck`` (a Hydra callback of ``conf/train.yaml``) checks each training job's config
before the job starts: settings that cannot be meant stop it in one line, settings that have no
effect are named in a warning.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .sizes import as_size, config_input_size, is_auto, trained_sizes

CONFIG_DIR = os.environ.get("CFA_CONFIG_DIR", str(Path(__file__).resolve().parent / "conf"))


@functools.lru_cache(maxsize=4)
def _checkpoint_sizes(ckpt_path: str, stamp: int | None) -> tuple[list[int], list[int] | None]:
    from .checkpoint import load_checkpoint  # torch: only when a config asks

    ckpt = load_checkpoint(ckpt_path)
    data = ckpt.get("datamodule_hyper_parameters") or {}
    resize, crop = trained_sizes(data, (ckpt.get("hyper_parameters") or {}).get("input_size"))
    return list(resize), list(crop) if crop else None


def checkpoint_data_size(ckpt_path: str, key: str) -> list[int] | None:
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


class ConfigError(SystemExit):
    """A setting that cannot be meant: ends the command with one line, before any work."""


def _hydra_node(cfg: DictConfig) -> DictConfig | None:
    """The ``hydra`` node of a job's config (a callback's, or compose(return_hydra_config=True))."""
    node = cfg.get("hydra")
    if node is None and _hydra_job() is not None:
        node = _hydra_job()
    return node


def command_line_keys(cfg: DictConfig) -> set[str]:
    """The keys the command line set (``data.pixels=...`` -> ``data.pixels``, ``data=x`` ->
    ``data``); empty outside Hydra."""
    node = _hydra_node(cfg)
    overrides = list(node.overrides.task) if node is not None else []
    return {o.lstrip("~+").split("=", 1)[0] for o in overrides}


def job_choices(cfg: DictConfig) -> dict[str, str]:
    """The config group choices of the job (``{"data": "mvtec", ...}``); empty outside Hydra."""
    node = _hydra_node(cfg)
    return dict(node.runtime.choices) if node is not None else {}


def group_default(group: str, choice: str | None, key: str):
    """``key`` as the shipped file ``<group>/<choice>.yaml`` sets it, following the first entry
    of its defaults list where it does not; None when unknown (another config folder)."""
    seen = set()
    while choice and choice not in seen:
        seen.add(choice)
        path = Path(CONFIG_DIR) / group / f"{choice}.yaml"
        if not path.is_file():
            return None
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        if key in node:
            value = node[key]
            return None if isinstance(value, str) and "${" in value else value
        parents = [d for d in node.get("defaults", []) if isinstance(d, str) and d != "_self_"]
        choice = parents[0] if parents else None
    return None


def _early_stopping(cfg: DictConfig) -> bool:
    callbacks = cfg.get("callbacks") or {}
    return any(
        isinstance(node, DictConfig) and str(node.get("_target_", "")).endswith(".EarlyStopping")
        for node in callbacks.values()
    )


def check_max_epochs(cfg: DictConfig) -> None:
    """``trainer.max_epochs`` caps the trained epochs: a positive int; null only where early
    stopping, ``max_steps`` or ``max_time`` ends the fit."""
    trainer = cfg.get("trainer") or {}
    epochs = trainer.get("max_epochs")
    other_cap = trainer.get("max_steps", -1) not in (None, -1) or trainer.get("max_time")
    if epochs in (None, -1) and not other_cap and not _early_stopping(cfg):
        shown = "null" if epochs is None else epochs
        raise ConfigError(
            f"error: trainer.max_epochs={shown} sets no epoch cap, and "
            f"protocol={cfg.get('protocol')} has no early stopping: the fit would not end "
            "(null: not before Lightning's default of 1000 epochs). Set the number of epochs to "
            "train, e.g. trainer.max_epochs=30"
        )
    if epochs is None:
        return
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(
            f"error: trainer.max_epochs={epochs!r} is not a number of epochs to train: give 1 or "
            "more, e.g. trainer.max_epochs=30 (a cap: the validated default stops earlier by "
            "early stopping; 0 trains nothing, -1 removes the cap)"
        )


def unused_pixels(cfg: DictConfig) -> str | None:
    """The warning for a data.pixels that has no effect: a value other than the data group's
    default (or one given on the command line) while data.image_size fixes the size."""
    data = cfg.get("data") or {}
    pixels, size = data.get("pixels"), data.get("image_size")
    if pixels is None or size is None or is_auto(size):
        return None
    default = group_default("data", job_choices(cfg).get("data"), "pixels")
    if "data.pixels" not in command_line_keys(cfg) and default in (None, pixels):
        return None  # the group's own budget, or a group of another config folder
    try:
        h, w = as_size(size)
    except (TypeError, ValueError):
        return None  # a bad size stops the run later, naming data.image_size
    if pixels == h * w:
        return None
    shown = size if isinstance(size, int) else f"[{h}, {w}]"
    return (
        f"data.pixels={pixels} has no effect: data.image_size={shown} fixes the model's input at "
        f"{h} x {w} ({h * w} pixels). data.pixels is the pixel budget of data.image_size=auto: "
        "set data.image_size=auto to size the input from the training images at that budget, "
        "or leave data.pixels out"
    )


def check_train_config(cfg: DictConfig) -> None:
    """Stop on settings of a composed train config that cannot be meant; warn on ignored ones."""
    message = unused_pixels(cfg)
    if message:
        from pytorch_lightning.utilities import rank_zero_warn  # training only: torch is there

        rank_zero_warn(message)
    check_max_epochs(cfg)


class ConfigCheck(Callback):
    """Hydra callback (conf/train.yaml): ``check_train_config`` before each job starts."""

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        check_train_config(config)


# The ${cfa_...:} resolvers the configs use, by name.
RESOLVERS = {
    "cfa_input_size": config_input_size,
    "cfa_sweep_group": sweep_group,
    "cfa_job_name": job_name,
    "cfa_checkpoint_size": checkpoint_data_size,
    "cfa_folder_name": folder_name,
    "cfa_tasks_per_node": tasks_per_node,
    "cfa_gpus_per_node": gpus_per_node,
    "cfa_ray_gpus_per_job": ray_gpus_per_job,
}


def register_resolvers() -> None:
    """Register each of RESOLVERS that OmegaConf does not know yet (safe to call again)."""
    for name, resolver in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


register_resolvers()
