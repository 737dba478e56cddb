"""CFA loss: attract the K nearest centres into radius r, repel the next J (docs/method.md,
section 4)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class CFALoss(nn.Module):
    """L = (L_att + L_rep) / nu on squared distances sorted ascending per patch.

    K: attracted centres, J: hard negatives sliced from position K, alpha: repulsion margin,
    nu: scale, r: hypersphere radius (a learnable parameter unless `learn_radius` is False).
    The settings are model.K, model.J, ... of conf/model/cfa.yaml, which holds their values.
    """

    def __init__(
        self, *, K: int, J: int, alpha: float, nu: float, radius: float, learn_radius: bool
    ) -> None:
        super().__init__()
        if K < 1 or J < 0:
            raise ValueError(f"need model.K >= 1 and model.J >= 0, got K={K}, J={J}")
        if not (math.isfinite(radius) and radius >= 0):
            raise ValueError(f"model.radius must be a finite value >= 0, got {radius}")
        self.K, self.J, self.alpha, self.nu = K, J, alpha, nu
        self.radius = nn.Parameter(torch.tensor(float(radius)), requires_grad=learn_radius)  # r

    def hinges(self, sorted_sq: Tensor) -> tuple[Tensor, Tensor]:
        """Each patch's attraction (N, K) and repulsion (N, J) terms, before the means."""
        r2 = self.radius.pow(2)
        attract = torch.relu(sorted_sq[:, : self.K] - r2)  # max(0, d_(k) - r^2), k <= K
        negatives = sorted_sq[:, self.K : self.K + self.J]  # slice from K, not from J
        return attract, torch.relu(r2 - negatives - self.alpha)  # max(0, r^2 - d_(j) - alpha)

    def forward(self, sorted_sq: Tensor) -> Tensor:
        """sorted_sq: (N, >= K + J) squared distances, ascending along dim 1."""
        attract, repel = self.hinges(sorted_sq)
        if self.J == 0:
            return attract.mean() / self.nu
        return (attract.mean() + repel.mean()) / self.nu

    def per_image(self, sorted_sq: Tensor, n_images: int) -> Tensor:
        """The loss of each image alone (B,), its patches' rows contiguous in ``sorted_sq``; their
        mean is `forward`'s loss (every image has as many patches)."""
        attract, repel = self.hinges(sorted_sq)
        loss = attract.reshape(n_images, -1).mean(dim=1)  # (B,)
        if self.J > 0:
            loss = loss + repel.reshape(n_images, -1).mean(dim=1)
        return loss / self.nu
