"""The pure CFA model (no Lightning) and its LightningModule."""

from .backbone import Backbone
from .cfa import CFA, CFAOutput
from .descriptor import PatchDescriptor
from .loss import CFALoss
from .memory_bank import MemoryBank, kmeans

__all__ = [
    "Backbone",
    "CFA",
    "CFAOutput",
    "CFALitModule",
    "CFALoss",
    "MemoryBank",
    "PatchDescriptor",
    "kmeans",
]


def __getattr__(name: str):
    # The LightningModule is imported lazily so that the pure model never pulls in Lightning.
    if name == "CFALitModule":
        from .lit_module import CFALitModule

        return CFALitModule
    raise AttributeError(name)
