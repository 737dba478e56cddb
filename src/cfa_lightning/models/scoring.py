"""Distances to the memory bank, chunked top-k, and the anomaly map (spec sections 3-4)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_CHUNK_BYTES = 32 * 2**20  # memory budget for one block of the (patches x centres) product


def float32_distances(x: Tensor) -> torch.autocast:
    """Turn autocast off: distances are accumulated in float32 even under bf16/fp16 training."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def squared_distances(p: Tensor, centres: Tensor, centres_sq: Tensor | None = None) -> Tensor:
    """d = ||p||^2 + ||c||^2 - 2 p.c in float32: (N, D'), (M, D') -> (N, M). May be slightly < 0."""
    with float32_distances(p):
        p = p.float()
        centres = centres.float()
        if centres_sq is None:
            centres_sq = centres.pow(2).sum(dim=1)
        d = torch.addmm(centres_sq.unsqueeze(0), p, centres.t(), beta=1.0, alpha=-2.0)  # (N, M)
        return d + p.pow(2).sum(dim=1, keepdim=True)


class _SelectedSquaredDistance(torch.autograd.Function):
    """||p_n - c_{idx[n, j]}||^2 for the selected centres only; saves indices, not (N, k, D')."""

    @staticmethod
    def forward(ctx, p: Tensor, centres: Tensor, idx: Tensor, step: int) -> Tensor:
        out = torch.empty(idx.shape, dtype=torch.float32, device=p.device)  # (N, k)
        with float32_distances(p):
            for s in range(0, p.shape[0], step):
                diff = p[s : s + step].float().unsqueeze(1) - centres[idx[s : s + step]].float()
                out[s : s + step] = diff.pow(2).sum(dim=-1)
        ctx.save_for_backward(p, centres, idx)
        ctx.step = step
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        p, centres, idx = ctx.saved_tensors
        grad_p = torch.empty_like(p, dtype=torch.float32)
        with float32_distances(p):
            for s in range(0, p.shape[0], ctx.step):
                g = grad_out[s : s + ctx.step].float()  # (n, k)
                c_sel = centres[idx[s : s + ctx.step]].float()  # (n, k, D')
                pulled = torch.einsum("nk,nkd->nd", g, c_sel)
                grad_p[s : s + ctx.step] = 2.0 * (
                    p[s : s + ctx.step].float() * g.sum(1, keepdim=True) - pulled
                )
        return grad_p.to(p.dtype), None, None, None


def selected_squared_distances(
    p: Tensor, centres: Tensor, idx: Tensor, budget_bytes: int = DEFAULT_CHUNK_BYTES
) -> Tensor:
    """Differentiable (w.r.t. p) squared distances to the centres in idx: (N, D'), (N, k) -> (N, k)."""
    per_row = 4 * idx.shape[1] * centres.shape[1] * 3  # gathered centres, difference, square
    step = max(1, budget_bytes // max(per_row, 1))
    return _SelectedSquaredDistance.apply(p, centres.detach(), idx, step)


def patch_scores(nearest_sq: Tensor) -> Tensor:
    """s = softmin(e_1..e_K)[0] * e_1 with e_k = sqrt(max(d_(k), 0)): (N, K) -> (N,)."""
    e = nearest_sq.clamp_min(0).sqrt()  # clamp before sqrt: the expanded form can dip below 0
    return F.softmin(e, dim=1)[:, 0] * e[:, 0]


def gaussian_sigma_kernel(sigma: float) -> int:
    """Odd kernel size covering +-4 sigma (sigma 4 -> 33, as in the spec)."""
    return 2 * math.ceil(4 * sigma) + 1


class GaussianBlur(nn.Module):
    """Separable Gaussian blur with reflect padding and a fixed kernel (exportable); sigma 0: none."""

    def __init__(self, sigma: float = 4.0) -> None:
        super().__init__()
        self.sigma = float(sigma)
        size = gaussian_sigma_kernel(sigma) if sigma > 0 else 1
        x = torch.arange(size, dtype=torch.float64) - size // 2
        kernel = torch.exp(-(x**2) / (2 * max(self.sigma, 1e-12) ** 2))
        self.register_buffer("kernel", (kernel / kernel.sum()).float(), persistent=False)

    def forward(self, maps: Tensor) -> Tensor:
        """(B, 1, H, W) -> (B, 1, H, W)."""
        size = self.kernel.numel()
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
