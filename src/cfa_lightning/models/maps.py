"""From the K nearest squared distances to patch scores, anomaly maps and image scores
(docs/method.md, section 5).

Everything here runs in float32 with autocast off, whatever the training precision: a bf16 map
of scores around 100 has steps of 0.5, so its maximum (the image score), its AUROC, AUPRO, F1
and calibrated thresholds would be computed on ties.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..sizes import gaussian_sigma_kernel


class CFAOutput(NamedTuple):
    image_scores: Tensor  # (B,) float32 max of the blurred map
    maps: Tensor  # (B, H, W) float32 blurred anomaly map at the input resolution


def patch_scores(nearest_sq: Tensor) -> Tensor:
    """s = softmin(e_1..e_K)[0] * e_1 with e_k = sqrt(max(d_(k), 0)): (N, K) -> (N,)."""
    e = nearest_sq.clamp_min(0).sqrt()  # clamp before sqrt: no NaN from a rounding below 0
    return F.softmin(e, dim=1)[:, 0] * e[:, 0]


class GaussianBlur(nn.Module):
    """Separable Gaussian blur with reflect padding and a fixed kernel (exportable); sigma 0: none."""

    def __init__(self, sigma: float = 4.0) -> None:
        super().__init__()
        self.sigma = float(sigma)
        size = gaussian_sigma_kernel(sigma) if sigma > 0 else 1
        self.size = size  # a Python int: no branch on the kernel buffer's shape (traces)
        x = torch.arange(size, dtype=torch.float64) - size // 2
        kernel = torch.exp(-(x**2) / (2 * max(self.sigma, 1e-12) ** 2))
        self.register_buffer("kernel", (kernel / kernel.sum()).float(), persistent=False)

    def forward(self, maps: Tensor) -> Tensor:
        """(B, 1, H, W) -> (B, 1, H, W)."""
        size = self.size
        if size == 1:
            return maps
        pad = size // 2
        x = F.pad(maps, (pad, pad, pad, pad), mode="reflect")
        x = F.conv2d(x, self.kernel.view(1, 1, 1, size))
        return F.conv2d(x, self.kernel.view(1, 1, size, 1))


def anomaly_map(scores: Tensor, output_size: tuple[int, int], blur: GaussianBlur) -> Tensor:
    """(B, h, w) patch scores -> bilinear upsample to output_size -> Gaussian blur (reflect)."""
    maps = F.interpolate(
        scores.unsqueeze(1), size=output_size, mode="bilinear", align_corners=False
    )  # (B, 1, H, W)
    return blur(maps).squeeze(1)  # (B, H, W)


def score_maps(
    nearest_sq: Tensor, grid: tuple[int, int, int], output_size, blur: GaussianBlur
) -> CFAOutput:
    """(B * h * w, K) nearest squared distances -> float32 image scores (B,) and maps (B, H, W).

    grid = (B, h, w), the patch layout of the rows; autocast is off and the inputs float32.
    """
    b, h, w = grid
    with torch.autocast(device_type=nearest_sq.device.type, enabled=False):
        scores = patch_scores(nearest_sq.float()).view(b, h, w)  # (B, h, w)
        maps = anomaly_map(scores, tuple(output_size), blur)  # (B, H, W)
        return CFAOutput(maps.flatten(1).amax(dim=1), maps)
