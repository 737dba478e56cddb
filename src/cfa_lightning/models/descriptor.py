"""Patch descriptor phi: pooled, resized, concatenated taps + CoordConv 1x1 (docs/method.md,
section 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PatchDescriptor(nn.Module):
    """phi: AvgPool3x3 on every tap, bilinear resize to the first tap's (h, w), concat, CoordConv.

    CoordConv = append the normalised (row, col) coordinates in [-1, 1] as two channels, then a
    1x1 convolution with bias from D + 2 to D' = D // gamma_d; it holds the only trainable weights.
    Z is assembled channels-last, so the 1x1 convolution is one matrix product and the patches
    come out as contiguous (h * w, D') rows with no further copy.

    tap_norm: every pooled tap is multiplied by its ``tap_scales`` (1 / its mean patch norm over
    the first bank batch, fitted by `fit_tap_scales` before the bank is built), so that each
    tap's patches have a norm of about 1 (raw lite0 taps: 26-41). The patch score's softmin
    depends on that scale (docs/method.md, section 5).
    """

    def __init__(self, in_channels: list[int], gamma_d: int = 1, tap_norm: bool = False) -> None:
        super().__init__()
        self.tap_norm = tap_norm
        if tap_norm:  # a buffer only when used: checkpoints without it load unchanged
            self.register_buffer("tap_scales", torch.ones(len(in_channels)))
        if gamma_d < 1:
            raise ValueError(f"model.gamma_d must be >= 1, got {gamma_d}")
        self.in_dim = int(sum(in_channels))  # D
        self.out_dim = self.in_dim // gamma_d  # D'
        if self.out_dim < 1:
            raise ValueError(f"model.gamma_d={gamma_d} leaves no channels from D={self.in_dim}")
        self.pool = nn.AvgPool2d(kernel_size=3, stride=1, padding=1)
        self.coord_conv = nn.Conv2d(self.in_dim + 2, self.out_dim, kernel_size=1, bias=True)

    def stack(self, features: list[Tensor]) -> Tensor:
        """[Z, rows, cols] channels-last: taps [(B, C_l, h_l, w_l)] -> (B, h, w, D + 2)."""
        b, _, h, w = features[0].shape  # (h, w) of Q_1
        parts = []
        for i, feat in enumerate(features):
            q = self.pool(feat)  # (B, C_l, h_l, w_l)
            if self.tap_norm:
                q = q * self.tap_scales[i].to(q.dtype)
            # a trace keeps the resize: to the tap's own size it changes nothing
            if torch.jit.is_tracing() or q.shape[-2:] != (h, w):
                q = F.interpolate(q, size=(h, w), mode="bilinear", align_corners=False)
            parts.append(q.permute(0, 2, 3, 1))  # (B, h, w, C_l), a view for channels-last taps
        ref = features[0]
        rows = torch.linspace(-1.0, 1.0, h, device=ref.device, dtype=ref.dtype)
        cols = torch.linspace(-1.0, 1.0, w, device=ref.device, dtype=ref.dtype)
        grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1)  # (h, w, 2)
        parts.append(grid.unsqueeze(0).expand(b, h, w, 2))
        return torch.cat(parts, dim=-1)

    @torch.no_grad()
    def fit_tap_scales(self, features: list[Tensor]) -> Tensor:
        """tap_scales = 1 / the mean L2 norm of each pooled tap's patches in ``features`` (a
        batch of bank images' taps); returns the scales."""
        norms = [self.pool(f).float().norm(dim=1).mean() for f in features]
        self.tap_scales.copy_(1.0 / torch.stack(norms).clamp_min(1e-12))
        return self.tap_scales

    def forward(self, features: list[Tensor]) -> Tensor:
        z = self.stack(features)  # (B, h, w, D + 2)
        out = F.linear(z, self.coord_conv.weight.flatten(1), self.coord_conv.bias)  # (B, h, w, D')
        return out.permute(0, 3, 1, 2)  # (B, D', h, w) with channels-last strides
