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


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("cfa_input_size"):
        OmegaConf.register_new_resolver("cfa_input_size", input_size)


register_resolvers()
