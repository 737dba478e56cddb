"""Memory bank C: exact per-position mean of phi's initial output, optional k-means (spec section 2)."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from .distances import SearchIndex, build_index

log = logging.getLogger(__name__)
# Buffers of the pruned search, removed: checkpoints written before still carry them.
RETIRED_BUFFERS = (
    "centre_mean",
    "basis",
    "basis_norm",
    "search_dims",
    "group_of",
    "_sum",
    "_count",
)


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
    """Holds C as a buffer. While it is built, float64 sums and a count (plain tensors, not
    buffers: nothing for DDP to broadcast, nothing in checkpoints) make the mean exact for any
    batch sizes."""

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
        self._index_cache: dict = {}
        self._sum: Tensor | None = None  # (D', h, w) float64, only while the bank is built
        self._count: Tensor | None = None  # () float64

    @property
    def n_centres(self) -> int:
        return self.centres.shape[0]

    def reset(self) -> None:
        self._sum = self._count = None
        self.fitted.fill_(False)

    @torch.no_grad()
    def update(self, descriptors: Tensor) -> None:
        """Add a batch of phi outputs (B, D', h, w) to the running sum."""
        shape = (self.dim, self.height, self.width)
        if tuple(descriptors.shape[1:]) != shape:
            raise ValueError(
                f"descriptor shape {tuple(descriptors.shape[1:])} does not match the bank's "
                f"{shape}; was the image size changed after the model was built?"
            )
        batch_sum = descriptors.detach().to(torch.float64).sum(dim=0)
        if self._sum is None:
            self._sum = torch.zeros_like(batch_sum)
            self._count = torch.zeros((), dtype=torch.float64, device=batch_sum.device)
        self._sum += batch_sum
        self._count += descriptors.shape[0]

    def running_sums(self) -> tuple[Tensor, Tensor]:
        """(sum (D', h, w), count ()) float64 of the batches seen since the last reset/finalize."""
        if self._sum is None:
            zero = torch.zeros((), dtype=torch.float64, device=self.centres.device)
            return torch.zeros(self.dim, self.height, self.width, dtype=torch.float64,
                               device=self.centres.device), zero  # fmt: skip
        return self._sum, self._count

    @torch.no_grad()
    def finalize(self, total_sum: Tensor | None = None, total_count: Tensor | None = None) -> None:
        """Mean -> (h*w, D') vectors -> optional k-means to (h*w) // gamma_c centres.

        `total_sum` / `total_count` let a distributed caller pass statistics reduced over ranks.
        """
        own_sum, own_count = self.running_sums()
        s = own_sum if total_sum is None else total_sum
        n = own_count if total_count is None else total_count
        if float(n) < 1:
            raise RuntimeError("memory bank has seen no training image; is the train split empty?")
        mean = (s / n).to(torch.float32)  # (D', h, w)
        vectors = mean.flatten(1).transpose(0, 1).contiguous()  # (h*w, D')
        if self.gamma_c > 1:
            vectors = kmeans(vectors, self.n_centres, seed=self.seed)
        self.centres.copy_(vectors)
        self.fitted.fill_(True)
        self._sum = self._count = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints from before the lean search carry the pruned search's buffers: drop them.
        retired = [prefix + name for name in RETIRED_BUFFERS if prefix + name in state_dict]
        for key in retired:
            del state_dict[key]
        if retired:
            log.info("checkpoint from an older version: ignored %s", ", ".join(retired))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def search_index(self) -> SearchIndex:
        """Centred centres and their squared norms for `distances.nearest`, built once and cached
        until the centres change (a new bank, a loaded checkpoint, a move to a device)."""
        if torch.compiler.is_compiling():  # traced into the graph: (M, D') work, no cache lookup
            return build_index(self.centres)
        key = (self.centres.device, self.centres.data_ptr(), self.centres._version)
        if self._index_cache.get("key") != key:
            self._index_cache = {"key": key, "index": build_index(self.centres)}
        return self._index_cache["index"]
