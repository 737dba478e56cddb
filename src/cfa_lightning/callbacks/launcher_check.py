"""A Hydra callback that checks a multirun's launcher before any job starts, and stops with advice.

Three mistakes would otherwise surface late or as a hang: a launcher preset whose plugin is not
installed, a Ray cluster address that cannot be reached (``ray.init`` waits a long time), and DDP
jobs under a launcher whose jobs cannot start their own ranks.
"""

from __future__ import annotations

import importlib.util
import socket
import threading
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

# The plugin behind each launcher, and the extra of this package that installs it.
PLUGINS = {
    "hydra_plugins.hydra_ray_launcher.": ("hydra-ray-launcher", "cluster"),
    "hydra_plugins.hydra_submitit_launcher.": ("hydra-submitit-launcher", "cluster"),
}
SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
RAY_CONNECT_TIMEOUT_S = 20.0


class LauncherCheckError(SystemExit):
    """Stops the multirun with a message (Hydra turns a callback's ordinary exception into a warning)."""


def check_plugin(target: str, preset: str) -> None:
    """The launcher's plugin must be importable; else name the extra that installs it."""
    for prefix, (dist, extra) in PLUGINS.items():
        if target.startswith(prefix) and importlib.util.find_spec(prefix.rstrip(".")) is None:
            raise LauncherCheckError(
                f"hydra/launcher={preset} needs the Hydra plugin {dist}, which is not installed: "
                f"pip install 'cfa-lightning[{extra}]' (or pip install {dist})"
            )


def check_ray_address(address: str | None, timeout_s: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """A given Ray address must answer as a Ray cluster within ``timeout_s``, else stop.

    ``ray.init`` retries an address that does not answer for a long time; here a TCP connection
    and, for a ``host:port`` head address, a call to its GCS, each bounded by the timeout, decide.
    """
    if not address or address in ("auto", "local"):
        return  # a local Ray is started (or found) by ray.init itself
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()  # reachable?
        if not address.startswith("ray://"):  # a Ray Client server is not a GCS
            _probe_gcs(address, timeout_s)
    except (OSError, ValueError, RuntimeError) as err:
        raise LauncherCheckError(
            f"Ray cluster at hydra.launcher.ray.init.address={address} cannot be reached within "
            f"{timeout_s:.0f} s ({type(err).__name__}: {err}). Start it (ray start --head) or fix "
            "the address; leave the address null to run a local Ray on this machine."
        ) from None


def _probe_gcs(address: str, timeout_s: float) -> None:
    """Connect to the cluster's GCS in a thread, so that an address that never answers cannot hang."""
    from ray._raylet import GcsClient

    errors: list[Exception] = []

    def connect() -> None:
        try:
            GcsClient(address=address)
        except Exception as err:  # Ray's RpcError and friends
            errors.append(err)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise RuntimeError("no answer from its GCS")
    if errors:
        raise RuntimeError(f"not a Ray GCS: {errors[0]}")


def uses_ddp(trainer: DictConfig) -> bool:
    """True when Lightning would start one process per device (and restart the script for them)."""
    strategy = str(trainer.get("strategy", ""))
    return strategy.startswith("ddp") and "spawn" not in strategy


def check_ddp(trainer: DictConfig | None, target: str) -> None:
    """DDP jobs run only where every rank is started by the scheduler: SLURM tasks."""
    if trainer is None or not uses_ddp(trainer) or target == SLURM_LAUNCHER:
        return
    raise LauncherCheckError(
        f"trainer.strategy={trainer.strategy} inside a multirun with {target.rpartition('.')[2]}: "
        "Lightning would restart the script for every rank, which a sweep job cannot do. Use "
        "hydra/launcher=slurm (one SLURM task per GPU, trainer.num_nodes nodes) for DDP jobs, or "
        "hydra/launcher=ray_gpus with trainer=gpu (one GPU per job, jobs in parallel); run DDP "
        "outside a sweep without -m."
    )


class LauncherCheck(Callback):
    """Runs in the launching process at the start of a multirun, before the launcher is built."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        launcher = config.hydra.launcher
        target = str(launcher.get("_target_", ""))
        preset = config.hydra.runtime.choices.get("hydra/launcher", target)
        check_plugin(target, preset)
        if "ray" in launcher:
            check_ray_address(launcher.ray.init.get("address"))
        check_ddp(config.get("trainer"), target)
