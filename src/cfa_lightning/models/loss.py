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
    """

    def __init__(
        self,
        K: int = 3,
        J: int = 3,
        alpha: float = 0.1,
        nu: float = 1e-3,
        radius: float = 1e-5,
        learn_radius: bool = True,
    ) -> None:
        super().__init__()
        if K < 1 or J < 0:
            raise ValueError(f"need model.K >= 1 and model.J >= 0, got K={K}, J={J}")
        if not (math.isfinite(radius) and radius >= 0):
            raise ValueError(f"model.radius must be a finite value >= 0, got {radius}")
        self.K, self.J, self.alpha, self.nu = K, J, alpha, nu
        self.radius = nn.Parameter(torch.tensor(float(radius)), requires_grad=learn_radius)  # r

    def forward(self, sorted_sq: Tensor) -> Tensor:
        """sorted_sq: (N, >= K + J) squared distances, ascending along dim 1."""
        r2 = self.radius.pow(2)
        attract = torch.relu(sorted_sq[:, : self.K] - r2).mean()
        if self.J == 0:
            return attract / self.nu
        negatives = sorted_sq[:, self.K : self.K + self.J]  # slice from K, not from J
        repel = torch.relu(r2 - negatives - self.alpha).mean()
        return (attract + repel) / self.nu
