"""Memory bank C: exact per-position mean of phi's initial output, optional k-means (spec section 2)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def kmeans(
    x: Tensor, n_clusters: int, n_iter: int = 100, seed: int = 0, tol: float = 1e-6
) -> Tensor:
    """Lloyd's k-means in float32 with k-means++ seeding from a fixed generator.

    x: (M, D'). Returns (n_clusters, D') centres. Empty clusters are refilled with the point
    farthest from its centre, so the count is always exactly n_clusters.
    """
    m = x.shape[0]
    if not 1 <= n_clusters <= m:
        raise ValueError(f"k-means needs 1 <= n_clusters <= {m} points, got {n_clusters}")
    x = x.float()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    first = int(torch.randint(m, (1,), generator=gen))
    centres = [x[first]]
    closest = ((x - x[first]) ** 2).sum(dim=1)  # (M,)
    for _ in range(1, n_clusters):
        weights = closest.clamp_min(0).cpu()
        idx = (
            int(torch.multinomial(weights, 1, generator=gen))
            if float(weights.sum()) > 0
            else int(torch.randint(m, (1,), generator=gen))
        )
        centres.append(x[idx])
        closest = torch.minimum(closest, ((x - x[idx]) ** 2).sum(dim=1))
    c = torch.stack(centres)  # (k, D')
    for _ in range(n_iter):
        d = torch.cdist(x, c)  # (M, k)
        assign = d.argmin(dim=1)
        new = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=n_clusters).to(x.dtype)
        empty = counts == 0
        new = new / counts.clamp_min(1).unsqueeze(1)
        if bool(empty.any()):
            far = d.gather(1, assign.unsqueeze(1)).squeeze(1).argsort(descending=True)
            new[empty] = x[far[: int(empty.sum())]]
        shift = (new - c).pow(2).sum(dim=1).max()
        c = new
        if float(shift) <= tol:
            break
    return c


class MemoryBank(nn.Module):
    """Holds C as buffers; sums and counts make the mean exact for any batch sizes."""

    def __init__(self, dim: int, height: int, width: int, gamma_c: int = 1, seed: int = 0) -> None:
        super().__init__()
        if gamma_c < 1:
            raise ValueError(f"model.gamma_c must be >= 1, got {gamma_c}")
        self.dim, self.height, self.width = dim, height, width
        self.gamma_c, self.seed = gamma_c, seed
        n_centres = (height * width) // gamma_c  # M
        if n_centres < 1:
            raise ValueError(
                f"model.gamma_c={gamma_c} leaves no centres from a {height}x{width} feature map"
            )
        self.register_buffer("centres", torch.zeros(n_centres, dim))  # (M, D')
        self.register_buffer("fitted", torch.tensor(False))
        # Running statistics while the bank is being built (float64 for an exact mean).
        self.register_buffer("_sum", torch.zeros(dim, height, width, dtype=torch.float64), False)
        self.register_buffer("_count", torch.zeros((), dtype=torch.float64), False)

    @property
    def n_centres(self) -> int:
        return self.centres.shape[0]

    def reset(self) -> None:
        self._sum.zero_()
        self._count.zero_()
        self.fitted.fill_(False)

    @torch.no_grad()
    def update(self, descriptors: Tensor) -> None:
        """Add a batch of phi outputs (B, D', h, w) to the running sum."""
        if descriptors.shape[1:] != self._sum.shape:
            raise ValueError(
                f"descriptor shape {tuple(descriptors.shape[1:])} does not match the bank's "
                f"{tuple(self._sum.shape)}; was the image size changed after the model was built?"
            )
        self._sum += descriptors.detach().to(torch.float64).sum(dim=0)
        self._count += descriptors.shape[0]

    @torch.no_grad()
    def finalize(self, total_sum: Tensor | None = None, total_count: Tensor | None = None) -> None:
        """Mean -> (h*w, D') vectors -> optional k-means to (h*w) // gamma_c centres.

        `total_sum` / `total_count` let a distributed caller pass statistics reduced over ranks.
        """
        s = self._sum if total_sum is None else total_sum
        n = self._count if total_count is None else total_count
        if float(n) < 1:
            raise RuntimeError("memory bank has seen no training image; is the train split empty?")
        mean = (s / n).to(torch.float32)  # (D', h, w)
        vectors = mean.flatten(1).transpose(0, 1).contiguous()  # (h*w, D')
        if self.gamma_c > 1:
            vectors = kmeans(vectors, self.n_centres, seed=self.seed)
        self.centres.copy_(vectors)
        self.fitted.fill_(True)
        self._sum.zero_()
        self._count.zero_()
