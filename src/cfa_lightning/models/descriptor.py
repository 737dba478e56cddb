"""Patch descriptor phi: pooled, resized, concatenated taps + CoordConv 1x1 (spec section 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CoordConv1x1(nn.Module):
    """Append normalised (row, col) coordinates in [-1, 1], then a 1x1 convolution with bias."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels + 2, out_channels, kernel_size=1, bias=True)

    def forward(self, z: Tensor) -> Tensor:
        b, _, h, w = z.shape  # (B, D, h, w)
        rows = torch.linspace(-1.0, 1.0, h, device=z.device, dtype=z.dtype)
        cols = torch.linspace(-1.0, 1.0, w, device=z.device, dtype=z.dtype)
        yy = rows.view(1, 1, h, 1).expand(b, 1, h, w)
        xx = cols.view(1, 1, 1, w).expand(b, 1, h, w)
        return self.conv(torch.cat([z, yy, xx], dim=1))  # (B, D', h, w)


class PatchDescriptor(nn.Module):
    """phi: AvgPool3x3 on every tap, bilinear resize to the first tap's (h, w), concat, CoordConv.

    D = sum(in_channels); D' = D // gamma_d. Only the CoordConv holds trainable weights.
    """

    def __init__(self, in_channels: list[int], gamma_d: int = 1) -> None:
        super().__init__()
        if gamma_d < 1:
            raise ValueError(f"model.gamma_d must be >= 1, got {gamma_d}")
        self.in_dim = int(sum(in_channels))  # D
        self.out_dim = self.in_dim // gamma_d  # D'
        if self.out_dim < 1:
            raise ValueError(f"model.gamma_d={gamma_d} leaves no channels from D={self.in_dim}")
        self.pool = nn.AvgPool2d(kernel_size=3, stride=1, padding=1)
        self.coord_conv = CoordConv1x1(self.in_dim, self.out_dim)

    def pool_and_stack(self, features: list[Tensor]) -> Tensor:
        """Z: the pooled taps resized to the first tap's full (h, w) pair and concatenated."""
        size = features[0].shape[-2:]  # (h, w) of Q_1
        pooled = []
        for feat in features:
            q = self.pool(feat)
            if q.shape[-2:] != size:
                q = F.interpolate(q, size=size, mode="bilinear", align_corners=False)
            pooled.append(q)
        return torch.cat(pooled, dim=1)  # (B, D, h, w)

    def forward(self, features: list[Tensor]) -> Tensor:
        return self.coord_conv(self.pool_and_stack(features))  # (B, D', h, w)
