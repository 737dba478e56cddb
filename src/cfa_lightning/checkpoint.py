"""Reading checkpoints safely: tensors and plain containers only, and one-line errors for bad files.

Every checkpoint this package reads goes through `load_checkpoint` (eval, predict, export, the
Python API, and `ckpt_path=` resume in train). It unpickles with `weights_only=True`, so a crafted
file cannot run code; our own checkpoints hold only tensors, numbers, strings and plain
containers, so no allowlist of extra classes is needed.

`rebuild_module` makes the model again from the flat model config a checkpoint saves as its
hyper-parameters (conf/model/cfa.yaml's keys, through `CFALitModule.from_config`). Checkpoints
of earlier versions hold the same flat list: retired options are dropped, options added since
read as those versions worked (`ADDED_HPARAMS`), and any other difference stops with one line
naming the version that wrote the file (saved as ``cfa_lightning_version``).
"""

from __future__ import annotations

import functools
import pickle
import re
import sys
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from . import __version__

ZIP_MAGIC = b"PK\x03\x04"  # torch.save has written zip archives since PyTorch 1.6


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and says what is wrong."""


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """The checkpoint's dict, unpickled with `weights_only=True`; CheckpointError if unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={str(path)!r} does not exist or is not a file")
    with open(path, "rb") as f:
        head = f.read(len(ZIP_MAGIC))
    if head != ZIP_MAGIC:
        raise CheckpointError(
            f"{path} is not a checkpoint: a PyTorch checkpoint is a zip archive, this file is not"
        )
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is truncated or damaged: its zip archive is incomplete")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        raise CheckpointError(
            f"{path} was refused: it holds pickled objects other than tensors and plain containers"
            f"{f' ({found.group(1)})' if found else ''}, which could run code when loaded"
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            f"{path} is truncated or damaged: {str(err).splitlines()[0]}"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (it has no state_dict)")
    return ckpt


# Options of the removed pruned search (and the naive-loss switch), still in older checkpoints.
RETIRED_HPARAMS = {"search_dims", "search_groups", "prune", "naive_loss"}
# Options added since the first release, and how the versions before each one worked: an older
# checkpoint that lacks one is read with this value. The bank and tap_norm shape the model;
# the others are the recipe's, which do not change a score.
ADDED_HPARAMS = {
    "threshold_quantile": 0.99,
    "threshold_rule": "auto",
    "val_pixel_stride": 2,
    "compile": False,
    "lr_schedule": "none",
    "untrained_epoch": False,
    "tap_cache_mb": 2048,
    "bank": {
        "construction": "positional",
        "size": None,
        "max_patches": 2**17,
        "projection_dim": 128,
    },
    "tap_norm": False,
}

ADDED_BACKBONE = {"weights": "timm"}  # the backbone group's options added since the first release


def written_by(ckpt: Mapping[str, Any]) -> str:
    """The version that wrote a checkpoint, in words."""
    version = ckpt.get("cfa_lightning_version")
    return f"cfa-lightning {version}" if version else "an earlier cfa-lightning (it records none)"


def rebuild_module(cls: type, ckpt: Mapping[str, Any], path: str | Path) -> Any:
    """A LightningModule of class ``cls`` from a loaded checkpoint: `cls.from_config` of its
    saved flat config, then its weights (the backbone's included, so no hub download)."""
    hparams = ckpt.get("hyper_parameters")
    if not isinstance(hparams, Mapping) or "backbone" not in hparams:
        raise CheckpointError(
            f"{path} is not a cfa-lightning checkpoint (no CFA hyper-parameters in it), or one "
            "of a CFALitModule built around a CFA object: build it with CFALitModule.from_config"
        )
    config = {**ADDED_HPARAMS, **{k: v for k, v in hparams.items() if k not in RETIRED_HPARAMS}}
    # a bank or backbone group saved before one of its options existed: read as those versions
    config["bank"] = {**ADDED_HPARAMS["bank"], **config["bank"]}
    config["backbone"] = {
        **ADDED_BACKBONE,
        **hparams["backbone"],
        "pretrained": False,
        "checkpoint_path": None,
    }
    known = set(cls.config_keys())
    unknown, missing = sorted(config.keys() - known), sorted(known - config.keys())
    if unknown or missing:
        found = []
        if unknown:
            found.append(f"options this version does not know: {', '.join(unknown)}")
        if missing:
            found.append(f"options it lacks: {', '.join(missing)}")
        raise CheckpointError(
            f"{path} was written by {written_by(ckpt)}, and cfa-lightning {__version__} cannot "
            f"rebuild its model ({'; '.join(found)}): load it with the version that wrote it, "
            "or train it again with this one"
        )
    module = cls.from_config(**config)
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        reason = " ".join(str(err).split())[:300]
        raise CheckpointError(
            f"{path} does not match the model its own hyper-parameters describe: {reason}"
        ) from None
    return module


def exits_on_checkpoint_error(main: Callable[..., Any]) -> Callable[..., Any]:
    """For command entry points: a CheckpointError ends the command with its one-line message."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except CheckpointError as err:
            sys.exit(f"error: {err}")

    return wrapper
