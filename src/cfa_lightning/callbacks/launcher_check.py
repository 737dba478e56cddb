"""A Hydra callback that checks a multirun's launcher before any job starts, and stops with advice.

Three mistakes would otherwise surface late or as a hang: a launcher preset whose plugin is not
installed, a Ray cluster address that cannot be reached (``ray.init`` waits a long time), and DDP
jobs under a launcher whose jobs cannot start their own ranks.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import time
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
    """A given Ray address must answer as a gRPC server within ``timeout_s``, else stop.

    ``ray.init`` retries an address that does not answer for a long time. Both a head's GCS
    (``host:port``) and a Ray Client server (``ray://host:port``) speak gRPC, so one bounded probe
    decides: a TCP connection, then the HTTP/2 preface, to which a gRPC server answers with its
    SETTINGS frame. A refused port, a host that never answers and a silent or foreign service stop
    here; everything after that is ``ray.init``'s, as the launcher calls it.
    """
    if not address or address in ("auto", "local"):
        return  # a local Ray is started (or found) by ray.init itself
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        _probe_grpc(host, int(port), timeout_s)
    except (OSError, ValueError) as err:
        raise LauncherCheckError(
            f"Ray cluster at hydra.launcher.ray.init.address={address} cannot be reached within "
            f"{timeout_s:.0f} s ({type(err).__name__}: {err}). Start it (ray start --head) or fix "
            "the address; leave the address null to run a local Ray on this machine."
        ) from None


_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_HTTP2_SETTINGS = 4  # frame type of a SETTINGS frame, the first frame a server sends


def _probe_grpc(host: str, port: int, timeout_s: float) -> None:
    """Connect, send the HTTP/2 preface and read the server's first frame header, all within
    ``timeout_s``; raise OSError or ValueError unless it is a SETTINGS frame."""
    deadline = time.monotonic() + timeout_s
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.sendall(_HTTP2_PREFACE)
        if os.environ.get("RAY_USE_TLS", "0") not in ("0", ""):
            return  # a TLS server does not answer a plain preface; reachable is all we can tell
        header = b""
        while len(header) < 9:  # length (3 bytes), type, flags, stream id (4)
            sock.settimeout(max(deadline - time.monotonic(), 1e-3))
            chunk = sock.recv(9 - len(header))
            if not chunk:
                raise ValueError("the connection was closed without an answer: not a Ray server")
            header += chunk
    if header[3] != _HTTP2_SETTINGS:
        raise ValueError("it answered, but not as a gRPC server: not a Ray GCS or client server")


def uses_ddp(trainer: DictConfig) -> bool:
    """True when Lightning would start one process per device (and restart the script for them)."""
    strategy = trainer.get("strategy", "")
    if isinstance(strategy, DictConfig):  # trainer=ddp: DDPStrategy(...) through `_target_`
        if not str(strategy.get("_target_", "")).endswith(".DDPStrategy"):
            return False
        return strategy.get("start_method", "popen") == "popen"
    strategy = str(strategy)
    return strategy.startswith("ddp") and "spawn" not in strategy


def check_ddp(trainer: DictConfig | None, target: str) -> None:
    """DDP jobs run only where every rank is started by the scheduler: SLURM tasks."""
    if trainer is None or not uses_ddp(trainer) or target == SLURM_LAUNCHER:
        return
    raise LauncherCheckError(
        f"DDP (trainer=ddp) inside a multirun with {target.rpartition('.')[2]}: "
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
