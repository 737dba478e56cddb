"""The small models the tests build, from the project's config as the command line composes it.

`conf/train.yaml`'s model group (`model_config`) with TINY's overrides on top, then the test's
own: a randomly initialised resnet18 at its three taps (nothing is downloaded), a 64 x 80 input,
the positional bank (h * w centres) and K = 3, the model these tests were written against. Every
other value is the shipped config's.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

TINY = (
    "backbone=resnet18",
    "backbone.name=resnet18",
    "backbone.out_indices=[1,2,3]",
    "backbone.pretrained=false",
    "model.input_size=[64,80]",
    "model/bank=positional",
    "model.K=3",
)


@functools.cache
def _composed(overrides: tuple[str, ...]) -> dict[str, Any]:
    from cfa_lightning.models.lit_module import model_config

    return model_config(*TINY, *overrides)


@functools.cache
def _group(*parts: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from cfa_lightning.config import CONFIG_DIR

    return OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR).joinpath(*parts)))


def bank_group(group: str = "positional", **values: Any) -> dict[str, Any]:
    """The model config's ``bank``: conf/model/bank/<group>.yaml, then ``values``."""
    return {**_group("model", "bank", f"{group}.yaml"), **values}


def bank_settings(group: str = "positional", **values: Any) -> dict[str, Any]:
    """MemoryBank's settings as the command line gives them: conf/model/bank/<group>.yaml,
    conf/model/cfa.yaml's gamma_c and a seed of 0, then ``values`` (size=None: h * w)."""
    return {
        **bank_group(group),
        "gamma_c": _group("model", "cfa.yaml")["gamma_c"],
        "seed": 0,
        **values,
    }


def backbone_settings(name: str, **values: Any) -> dict[str, Any]:
    """Backbone's settings as the backbone group gives them (conf/backbone/resnet18.yaml, less its
    `_target_`) for the timm model ``name``, then ``values``."""
    group = {k: v for k, v in _group("backbone", "resnet18.yaml").items() if k != "_target_"}
    return {**group, "name": name, **values}


def tiny_config(*overrides: str, **values: Any) -> dict[str, Any]:
    """The flat model config: TINY, then Hydra ``overrides`` ("model.J=0"), then ``values``
    that replace whole keys (bank=bank_group("coreset", size=100))."""
    return {**copy.deepcopy(_composed(overrides)), **values}


def tiny_module(*overrides: str, **values: Any):
    """A CFALitModule built as conf/model/cfa.yaml builds it (`from_config`)."""
    from cfa_lightning.models.lit_module import CFALitModule

    return CFALitModule.from_config(**tiny_config(*overrides, **values))


def tiny_cfa(*overrides: str, **values: Any):
    """The pure CFA of the same config (the module's model)."""
    return tiny_module(*overrides, **values).model
