"""The small models the tests build, from the project's config as the command line composes it.

`conf/train.yaml`'s model group (`model_config`) with TINY's overrides on top, then the test's
own: a randomly initialised resnet18 at its three taps (nothing is downloaded), a 64 x 80 input,
the positional bank (h * w centres) and K = 3, the model these tests were written against. Every
other value is the shipped config's.
"""

from __future__ import annotations

import copy
import functools
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


def tiny_config(*overrides: str, **values: Any) -> dict[str, Any]:
    """The flat model config: TINY, then Hydra ``overrides`` ("model.J=0"), then ``values``
    that replace whole keys (bank={"construction": "coreset", "size": 100})."""
    return {**copy.deepcopy(_composed(overrides)), **values}


def tiny_module(*overrides: str, **values: Any):
    """A CFALitModule built as conf/model/cfa.yaml builds it (`from_config`)."""
    from cfa_lightning.models.lit_module import CFALitModule

    return CFALitModule.from_config(**tiny_config(*overrides, **values))


def tiny_cfa(*overrides: str, **values: Any):
    """The pure CFA of the same config (the module's model)."""
    return tiny_module(*overrides, **values).model
