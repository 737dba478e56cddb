"""Memory bank C: exact per-position mean of phi's initial output, optional k-means (spec section 2).

Once C is final, the bank also fits what the exact pruned search (`search.py`) bounds with: the
principal directions of its centres and a k-means grouping of them. Both are buffers, so
checkpoints carry them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .search import CentreGroups, SearchIndex

VARIANCE_KEPT = 0.9  # auto search_dims: the fewest principal directions keeping this variance
GROUP_ITERATIONS = 25  # Lloyd iterations of the centre grouping (a coarse partition is enough)


def auto_groups(n_centres: int) -> int:
    """G, the number of centre groups when none is configured: about sqrt(M)."""
    return max(1, round(math.sqrt(n_centres)))


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

    def __init__(
        self,
        dim: int,
        height: int,
        width: int,
        gamma_c: int = 1,
        seed: int = 0,
        search_groups: int | None = None,
    ) -> None:
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
        if search_groups is not None and not 1 <= search_groups <= n_centres:
            raise ValueError(
                f"model.search_groups={search_groups} is outside the valid range 1..{n_centres} "
                "(the bank's centres); null chooses it when the bank is built"
            )
        self.search_groups = search_groups
        self.register_buffer("centres", torch.zeros(n_centres, dim))  # (M, D')
        self.register_buffer("fitted", torch.tensor(False))
        # Principal directions and groups of C for the pruned search, fitted with C (see fit_search).
        self.register_buffer("centre_mean", torch.zeros(dim))  # mu (D',)
        self.register_buffer("basis", torch.eye(dim))  # (D', D') columns by falling variance
        self.register_buffer("basis_norm", torch.tensor(1.0, dtype=torch.float64))  # sigma
        self.register_buffer("search_dims", torch.tensor(dim))  # auto-chosen k'; D' = no pruning
        self.register_buffer("group_of", torch.zeros(n_centres, dtype=torch.int64))  # (M,) group
        self._index_cache: dict = {}
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
        self.fit_search()
        self.fitted.fill_(True)
        self._sum.zero_()
        self._count.zero_()

    @torch.no_grad()
    def fit_search(self, variance_kept: float = VARIANCE_KEPT) -> None:
        """What the pruned search bounds with: principal directions (float64) with the number k'
        of them to use, and a grouping of the centres into G k-means groups.

        k' is the fewest directions keeping `variance_kept` of the centres' variance; when that is
        over D' / 4, a projection costs too much to pay and k' = D' (groups only). G is
        `search_groups`, or about sqrt(M).
        """
        basis, mean, sigma, dims = principal_directions(self.centres, variance_kept)
        self.centre_mean.copy_(mean)
        self.basis.copy_(basis)
        self.basis_norm.fill_(sigma)
        self.search_dims.fill_(dims)
        self.group_of.copy_(group_centres(self.centres, self.search_groups, self.seed))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints from before the pruned search lack its buffers: fit them from the centres.
        centres = state_dict.get(prefix + "centres")
        if centres is not None and prefix + "basis" not in state_dict:
            basis, mean, sigma, dims = principal_directions(centres)
            state_dict[prefix + "centre_mean"] = mean
            state_dict[prefix + "basis"] = basis
            state_dict[prefix + "basis_norm"] = torch.tensor(sigma, dtype=torch.float64)
            state_dict[prefix + "search_dims"] = torch.tensor(dims)
        if centres is not None and prefix + "group_of" not in state_dict:
            state_dict[prefix + "group_of"] = group_centres(centres, self.search_groups, self.seed)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def search_index(self, pruned: bool = False, dims: int | None = None) -> SearchIndex:
        """Centred centres for `search.nearest`; pruned: with the groups, and with k' = `dims`
        projected dimensions (None: the fitted k'; D': no projection).

        Cached until a buffer changes (a new bank, a loaded checkpoint, a move to a device).
        """
        dim = self.centres.shape[1]
        dims = int(self.search_dims) if dims is None else dims
        if not 1 <= dims <= dim:
            raise ValueError(f"model.search_dims={dims} is outside the valid range 1..{dim} (D')")
        key = (pruned, dims) + tuple(
            (t.device, t.data_ptr(), t._version)
            for t in (self.centres, self.basis, self.centre_mean, self.group_of)
        )
        if self._index_cache.get("key") != key:
            self._index_cache = {"key": key, "index": self._build_index(pruned, dims)}
        return self._index_cache["index"]

    @torch.no_grad()
    def _build_index(self, pruned: bool, dims: int) -> SearchIndex:
        centres = self.centres.float()
        mean = self.centre_mean.float()
        centred = (centres.double() - mean.double()).float()  # y (M, D'), one rounding
        centred_sq = centred.square().sum(dim=1)
        basis = projected = projected_sq = groups = None
        projected_max = 0.0
        if pruned:
            groups = build_groups(centres, mean, self.group_of)
            if dims < centres.shape[1]:
                basis = self.basis[:, :dims].float().contiguous()  # W (D', k')
                projected = (centred.double() @ basis.double()).float()  # W^T y (M, k')
                projected_sq = projected.square().sum(dim=1)
                projected_max = float(projected_sq.max().sqrt())
        return SearchIndex(
            centres=centres,
            mean=mean,
            centred=centred,
            centred_sq=centred_sq,
            centred_max=float(centred_sq.max().sqrt()),
            groups=groups,
            basis=basis,
            projected=projected,
            projected_sq=projected_sq,
            projected_max=projected_max,
            sigma=max(float(self.basis_norm), 1.0),
        )


@torch.no_grad()
def group_centres(centres: Tensor, n_groups: int | None, seed: int) -> Tensor:
    """(M,) group of every centre: k-means of the centres into G groups (G = n_groups or about
    sqrt(M), at most M); groups that end up empty are simply absent."""
    m = centres.shape[0]
    g = min(n_groups or auto_groups(m), m)
    means = kmeans(centres, g, n_iter=GROUP_ITERATIONS, seed=seed)
    return torch.cdist(centres.float(), means).argmin(dim=1)


@torch.no_grad()
def build_groups(centres: Tensor, mean: Tensor, group_of: Tensor) -> CentreGroups:
    """Group means, radii and members for the triangle-inequality bound of `search.py`.

    The radius is measured from the group mean as the search uses it, mu + fl(mu_g - mu), in
    float64, and padded by a relative 1e-9 for float64 rounding.
    """
    ids, group_of = torch.unique(group_of, return_inverse=True)  # drop empty groups
    n_groups, device = ids.numel(), centres.device
    c64 = centres.double()
    count = torch.bincount(group_of, minlength=n_groups).double()
    sums = torch.zeros(n_groups, c64.shape[1], dtype=torch.float64, device=device)
    means = sums.index_add_(0, group_of, c64) / count.unsqueeze(1)  # (G, D')
    centred = (means - mean.double()).float()  # fl(mu_g - mu): the group point the search sees
    point = mean.double() + centred.double()
    dist = (c64 - point[group_of]).norm(dim=1)  # (M,) float64
    radius = torch.zeros(n_groups, dtype=torch.float64, device=device)
    radius = radius.scatter_reduce(0, group_of, dist, reduce="amax") * (1 + 1e-9)
    order = torch.argsort(group_of, stable=True)
    members = tuple(order.split(torch.bincount(group_of, minlength=n_groups).tolist()))
    centred_sq = centred.square().sum(dim=1)
    return CentreGroups(
        group_of=group_of,
        members=members,
        centred=centred,
        centred_sq=centred_sq,
        centred_max=float(centred_sq.max().sqrt()),
        radius=radius,
    )


@torch.no_grad()
def principal_directions(
    centres: Tensor, variance_kept: float = VARIANCE_KEPT
) -> tuple[Tensor, Tensor, float, int]:
    """(M, D') centres -> basis (D', D') by falling variance, mean (D',), sigma, auto k'.

    sigma = ||W||_2 of the float32 basis, computed in float64: the lower bound divides by it.
    """
    x = centres.double()
    mean = x.mean(dim=0)
    xc = x - mean
    cov = xc.t() @ xc / max(x.shape[0], 1)  # (D', D')
    eigval, eigvec = torch.linalg.eigh(cov)  # ascending
    eigval, basis = eigval.flip(0).clamp_min(0), eigvec.flip(1)
    basis32 = basis.float()
    sigma = float(torch.linalg.matrix_norm(basis32.double(), ord=2))
    dim = x.shape[1]
    total = float(eigval.sum())
    if total > 0:
        kept = torch.cumsum(eigval, 0) / total
        dims = int((kept < variance_kept).sum()) + 1
    else:
        dims = 1
    dims = min(dims, dim)
    if dims > dim / 4:
        dims = dim
    return basis32, mean.float(), max(sigma, 1.0), int(math.ceil(dims))
