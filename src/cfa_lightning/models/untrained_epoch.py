"""The untrained epoch 0 of a validated fit, and every use of the epoch numbering it brings.

With it (``validate_untrained: true``, the validated protocol), Lightning's epoch 0 trains
nothing and its validation scores the un-adapted phi, so that selection can choose "no
training"; Lightning's epoch e is then the model after e training epochs. Without it, epoch e
is the model after e + 1. Logs, checkpoint names and metrics.json count trained epochs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor, nn


class UntrainedEpoch:
    def __init__(self, enabled: bool) -> None:
        self.enabled = bool(enabled)

    @property
    def offset(self) -> int:
        """Lightning epochs that train nothing: 1 with the untrained epoch, else 0."""
        return int(self.enabled)

    def active(self, epoch: int) -> bool:
        """Is Lightning's ``epoch`` the untrained one?"""
        return self.enabled and epoch == 0

    def trained(self, epoch: int) -> int:
        """Training epochs behind the model at the end of Lightning's ``epoch``."""
        return epoch + 1 - self.offset

    def lightning_max_epochs(self, max_epochs: int | None) -> int | None:
        """``trainer.max_epochs`` counts trained epochs; Lightning runs the untrained one too."""
        if max_epochs is None or max_epochs < 0:
            return max_epochs
        return max_epochs + self.offset

    @staticmethod
    def zero_loss(module: nn.Module) -> Tensor:
        """A zero loss through the trainable parameters only (no backbone pass): DDP needs a
        backward on every rank, and a training step returning None is refused under DDP."""
        return sum(p.sum() for p in module.parameters() if p.requires_grad) * 0.0

    def cosine(self, lightning_max_epochs: int) -> Callable[[int], float]:
        """The cosine schedule's factor per finished Lightning epoch: 1 for the first trained
        epoch, decaying towards 0 over the trained epochs; the untrained epoch holds at 1."""
        epochs = max(lightning_max_epochs - self.offset, 1)

        def factor(epoch: int) -> float:
            return 0.5 * (1.0 + math.cos(math.pi * max(epoch - self.offset, 0) / epochs))

        return factor
