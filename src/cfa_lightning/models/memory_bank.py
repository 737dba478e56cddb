"""Memory bank C, built once from phi's initial output and then frozen (docs/method.md, bank).

Three constructions (config group ``model/bank``):
- ``positional``: the exact mean over the training images at every feature-map position
  (h * w centres, the authors' code), optionally compressed by k-means to (h * w) // gamma_c;
- ``kmeans``: k-means over the patches of all bank images (the paper's text);
- ``coreset``: greedy k-center selection over the same patches: the centres are real patches.

A centre made from one training image's patches alone (a coreset's real patch, a k-means cluster
of one image) is that image's own copy: ``owners`` records the image, and the loss leaves it out
of that image's search (docs/method.md, "own copies"), so adaptation is not pulled back to it.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .distances import SearchIndex, build_index

log = logging.getLogger(__name__)
# Buffers of the retired pruned search, which older checkpoints still carry; dropped on load.
RETIRED_BUFFERS = (
    "centre_mean",
    "basis",
    "basis_norm",
    "search_dims",
    "group_of",
    "_sum",
    "_count",
)
CONSTRUCTIONS = ("positional", "kmeans", "coreset")
NO_OWNER = -1  # a centre made from several images (a positional mean, a mixed k-means cluster)


def image_ids(paths: Sequence[str] | None, n: int, device: torch.device | None = None) -> Tensor:
    """(n,) int64 ids of a batch's images: a hash of each path, the same on every rank and in
    every epoch; NO_OWNER where the batch carries no paths."""
    if paths is None:
        return torch.full((n,), NO_OWNER, dtype=torch.long, device=device)
    ids = [int.from_bytes(hashlib.blake2b(str(p).encode(), digest_size=8).digest(), "little") >> 1
           for p in paths]  # fmt: skip
    return torch.tensor(ids, dtype=torch.long, device=device)


def cluster_owners(labels: Tensor, point_owners: Tensor, n_clusters: int) -> Tensor:
    """(n_clusters,) the image whose patches alone form each cluster, NO_OWNER for a cluster of
    several images (or none). labels, point_owners: (P,) int64."""
    low = torch.full((n_clusters,), torch.iinfo(torch.long).max, dtype=torch.long)
    high = torch.full((n_clusters,), torch.iinfo(torch.long).min, dtype=torch.long)
    low = low.scatter_reduce(0, labels, point_owners, "amin")
    high = high.scatter_reduce(0, labels, point_owners, "amax")
    return torch.where(low == high, low, torch.full_like(low, NO_OWNER))


def kmeans(x: Tensor, n_clusters: int, n_iter: int = 20, seed: int = 0) -> tuple[Tensor, Tensor]:
    """k-means of x (N, D) into n_clusters centres (float32), with faiss's seeded k-means;
    returns the centres and each point's cluster (N,) int64 (on the CPU).

    faiss, not a Lloyd's loop of our own (experiments/results/speed.md, k-means for the bank).
    Empty clusters are refilled by splitting large ones, so the count is always
    exactly n_clusters. Runs on the CPU; the centres return to x's device.
    """
    import faiss

    m, dim = x.shape
    if not 1 <= n_clusters <= m:
        raise ValueError(f"k-means needs 1 <= n_clusters <= {m} points, got {n_clusters}")
    data = x.detach().float().cpu().contiguous().numpy()
    km = faiss.Kmeans(
        dim,
        n_clusters,
        niter=n_iter,
        seed=seed,
        min_points_per_centroid=1,  # few points per centre is normal here: no warning
        max_points_per_centroid=max(1, -(-m // n_clusters)),  # every point, no subsample
    )
    km.train(data)
    _, labels = km.index.search(data, 1)  # (N, 1): each point's nearest final centre
    return torch.from_numpy(km.centroids.copy()).to(x.device), torch.from_numpy(labels[:, 0])


def greedy_coreset(x: Tensor, n: int, seed: int = 0, projection_dim: int | None = 128) -> Tensor:
    """Indices (n,) of a greedy k-center selection from x (N, D): each step takes the point
    farthest from those already chosen, so the chosen points cover x.

    Distances are measured on a seeded Gaussian random projection to ``projection_dim``
    dimensions (when D is larger), which keeps them within a small factor (Johnson-Lindenstrauss)
    at a fraction of the cost; the selected points themselves keep all D dimensions.
    """
    total = x.shape[0]
    if not 1 <= n <= total:
        raise ValueError(f"a coreset needs 1 <= n <= {total} points, got {n}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    z = x.float()
    if projection_dim is not None and z.shape[1] > projection_dim:
        proj = torch.randn(z.shape[1], projection_dim, generator=gen) / math.sqrt(projection_dim)
        z = z @ proj.to(z.device)  # (N, projection_dim)
    z_sq = z.square().sum(dim=1)  # (N,)
    chosen = torch.empty(n, dtype=torch.long)
    i = int(torch.randint(total, (1,), generator=gen))
    farthest = torch.full((total,), float("inf"), device=z.device)  # distance to the chosen set
    for step in range(n):
        chosen[step] = i
        d = torch.addmv(z_sq, z, z[i], alpha=-2.0).add_(z_sq[i])  # (N,) ||z - z_i||^2
        torch.minimum(farthest, d, out=farthest)
        i = int(farthest.argmax())
    return chosen


def bank_size(
    size: int | float | None,
    construction: str,
    height: int,
    width: int,
    gamma_c: int = 1,
    n_patches: int | None = None,
) -> int | None:
    """Number of centres M. ``size``: an int, a fraction in (0, 1] of all ``n_patches`` bank
    patches, or None (h * w). None when a fraction is given and n_patches is not known yet."""
    if construction not in CONSTRUCTIONS:
        raise ValueError(
            f"model/bank={construction!r} is not a bank construction; choose one of "
            f"{', '.join(CONSTRUCTIONS)}"
        )
    if gamma_c < 1:
        raise ValueError(f"model.gamma_c must be >= 1, got {gamma_c}")
    if construction == "positional":
        if size is not None:  # a sweep over constructions and sizes passes it to every job
            log.warning(
                "model.bank.size=%s is ignored by model/bank=positional, whose size is "
                "(h * w) // model.gamma_c",
                size,
            )
        m = (height * width) // gamma_c
        if m < 1:
            raise ValueError(
                f"model.gamma_c={gamma_c} leaves no centres from a {height}x{width} feature map"
            )
        return m
    if gamma_c != 1:
        raise ValueError(
            f"model.gamma_c={gamma_c} compresses the positional bank only; with "
            f"model/bank={construction} set model.bank.size instead"
        )
    if size is None:
        return height * width
    if isinstance(size, bool) or not isinstance(size, int | float):
        raise ValueError(f"model.bank.size={size!r}; give a number of centres or a fraction")
    if isinstance(size, int):
        if size < 1:
            raise ValueError(f"model.bank.size={size} must be >= 1 centre")
        return size
    if not 0 < size <= 1:
        raise ValueError(
            f"model.bank.size={size} is a fraction outside (0, 1]; give a fraction of all bank "
            "patches in (0, 1] or a whole number of centres"
        )
    if n_patches is None:
        return None
    return max(1, round(size * n_patches))


def available_memory_bytes() -> int | None:
    """Memory the system can still give (MemAvailable), or None where it cannot tell."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class MemoryBank(nn.Module):
    """Holds C as a buffer (its row count is restored from checkpoints).

    While it is built: for ``positional``, float64 sums and a count make the mean exact for any
    batch sizes; for ``kmeans`` and ``coreset``, a seeded random sample of each image's patches
    (all of them while the pool stays within ``max_patches``) is kept as the pool the centres
    come from. These are plain tensors, not buffers: nothing for DDP to broadcast, nothing in
    checkpoints.
    """

    def __init__(
        self,
        dim: int,
        height: int,
        width: int,
        construction: str = "positional",
        size: int | float | None = None,
        gamma_c: int = 1,
        seed: int = 0,
        max_patches: int = 2**17,
        projection_dim: int | None = 128,
    ) -> None:
        super().__init__()
        self.dim, self.height, self.width = dim, height, width
        self.construction, self.size, self.gamma_c, self.seed = construction, size, gamma_c, seed
        if isinstance(max_patches, bool) or not isinstance(max_patches, int) or max_patches < 1:
            raise ValueError(f"model.bank.max_patches={max_patches!r}; give a count >= 1")
        self.max_patches, self.projection_dim = max_patches, projection_dim
        n_centres = bank_size(size, construction, height, width, gamma_c)  # M, None: a fraction
        self.register_buffer("centres", torch.zeros(n_centres or height * width, dim))  # (M, D')
        self.register_buffer("fitted", torch.tensor(False))
        # (M,) int64: the training image each centre copies, NO_OWNER if none (see the docstring)
        self.register_buffer("owners", torch.full((self.centres.shape[0],), NO_OWNER))
        self._index_cache: dict = {}
        self.reset()

    @property
    def n_centres(self) -> int:
        return self.centres.shape[0]

    @property
    def pooled(self) -> bool:
        """True when the centres come from a pool of patches (kmeans, coreset)."""
        return self.construction != "positional"

    def patches_per_image(self, n_images: int) -> int:
        """How many patches of each image the pool keeps: all of them (h * w) unless that would
        pass max_patches over ``n_images`` images."""
        return max(1, min(self.height * self.width, self.max_patches // max(n_images, 1)))

    def pool_size(self, n_images: int) -> int:
        """Patches in the pool that ``n_images`` images give: the most centres a build can take."""
        return n_images * self.patches_per_image(n_images)

    def centres_for(self, n_images: int) -> int:
        """M for a bank built from ``n_images`` images, checked against the pool they give."""
        n_patches = n_images * self.height * self.width
        m = bank_size(self.size, self.construction, self.height, self.width, self.gamma_c,
                      n_patches)  # fmt: skip
        if self.pooled and m > self.pool_size(n_images):
            pool = self.pool_size(n_images)
            raise ValueError(
                f"model.bank.size={self.size} asks for {m} centres, but the {n_images} bank images "
                f"give {n_patches} patches of which the build keeps {pool} "
                f"(model.bank.max_patches={self.max_patches}); the largest valid size is {pool} "
                f"(or {pool / n_patches:.4g} as a fraction)"
            )
        return m

    def build_bytes(self, n_images: int) -> int:
        """An estimate of the peak memory the bank's build needs besides the model and the
        backbone's working memory over one batch: the pool twice while its batches are joined,
        then the pool beside the selection's work."""
        if not self.pooled:
            return 8 * self.dim * self.height * self.width
        pool = self.pool_size(n_images)
        pool_bytes = pool * self.dim * 4  # float32
        if self.construction == "coreset":
            dims = min(self.dim, self.projection_dim or self.dim)
            work = pool * (2 * dims + 2) * 4  # its projection and the product's, distances
        else:
            work = pool * (self.dim * 4 + 16)  # faiss's copy, assignments and distances
        return max(2 * pool_bytes, pool_bytes + work)

    def check_memory(self, n_images: int) -> None:
        """Stop before a build of ``n_images`` images that the system's memory cannot hold."""
        need, available = self.build_bytes(n_images), available_memory_bytes()
        if available is not None and need > available:
            raise MemoryError(
                f"building the {self.construction} bank needs about {need / 2**30:.1f} GiB for "
                f"{self.pool_size(n_images)} patches of {self.dim} dims, but only "
                f"{available / 2**30:.1f} GiB is available; lower model.bank.max_patches, "
                "model.gamma_d or data.image_size"
            )

    def reset(self, n_images: int | None = None) -> None:
        """Start a build of ``n_images`` images in all (all ranks), which sets the per-image quota
        of the pool (None: keep every patch)."""
        self._start_build(n_images)
        self.fitted.fill_(False)

    def _start_build(self, n_images: int | None) -> None:
        self._sum: Tensor | None = None  # positional: (D', h, w) float64
        self._count: Tensor | None = None  # () float64
        self._pool: list[Tensor] = []  # kmeans, coreset: [(n, D') float32]
        self._pool_owners: list[Tensor] = []  # the image of each pooled patch: [(n,) int64]
        self._quota = (
            self.height * self.width if n_images is None else self.patches_per_image(n_images)
        )
        self._gen = torch.Generator(device="cpu").manual_seed(self.seed)

    @torch.no_grad()
    def update(self, descriptors: Tensor, owners: Tensor | None = None) -> None:
        """Add a batch of phi outputs (B, D', h, w); ``owners``: the images' ids (B,) int64
        (`image_ids`; None: unknown, no centre will be left out of any image's search)."""
        shape = (self.dim, self.height, self.width)
        if tuple(descriptors.shape[1:]) != shape:
            raise ValueError(
                f"descriptor shape {tuple(descriptors.shape[1:])} does not match the bank's "
                f"{shape}; was the image size changed after the model was built?"
            )
        descriptors = descriptors.detach()
        if self._count is None:
            self._count = torch.zeros((), dtype=torch.float64, device=descriptors.device)
        self._count += descriptors.shape[0]
        if self.pooled:
            patches = descriptors.float().flatten(2).transpose(1, 2)  # (B, h*w, D')
            b, hw = patches.shape[:2]
            if owners is None:
                owners = torch.full((b,), NO_OWNER, dtype=torch.long)
            quota = min(self._quota, hw)
            self._pool_owners.append(owners.detach().cpu().long().repeat_interleave(quota))
            if self._quota < hw:
                keep = torch.stack([torch.randperm(hw, generator=self._gen)[: self._quota]
                                    for _ in range(patches.shape[0])])  # fmt: skip
                patches = patches.gather(
                    1, keep.to(patches.device).unsqueeze(2).expand(-1, -1, patches.shape[2])
                )  # (B, quota, D')
            self._pool.append(patches.reshape(-1, patches.shape[2]))
            return
        batch_sum = descriptors.to(torch.float64).sum(dim=0)
        if self._sum is None:
            self._sum = torch.zeros_like(batch_sum)
        self._sum += batch_sum

    def statistics(self) -> tuple[Tensor, Tensor]:
        """What this process has seen since the last reset: (sums (D', h, w) float64 for
        positional, or the pool (P, D') float32; and the image count () float64)."""
        device = self.centres.device
        count = (
            self._count
            if self._count is not None
            else torch.zeros((), dtype=torch.float64, device=device)
        )
        if self.pooled:
            pool = torch.cat(self._pool) if self._pool else torch.zeros(0, self.dim, device=device)
            self._pool = [pool]  # one copy of the pool, not the batches' and their concatenation
            return pool, count
        if self._sum is None:
            return torch.zeros(self.dim, self.height, self.width, dtype=torch.float64,
                               device=device), count  # fmt: skip
        return self._sum, count

    def pool_owners(self) -> Tensor:
        """(P,) int64: the image of each pooled patch, in the pool's order (`statistics`)."""
        if not self._pool_owners:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat(self._pool_owners)

    @torch.no_grad()
    def finalize(
        self, stats: Tensor | None = None, count: Tensor | None = None, owners: Tensor | None = None
    ) -> None:
        """Centres from the statistics of the whole build (`statistics`, reduced over ranks by a
        distributed caller; None: this process's own), and each centre's owner from the pool's
        (`pool_owners`, gathered like the pool)."""
        if stats is None or count is None:  # a single process: its own statistics
            stats, count = self.statistics()
            owners = self.pool_owners()
        n = count
        n_images = int(n)
        if n_images < 1:
            raise RuntimeError("memory bank has seen no training image; is the train split empty?")
        m = self.centres_for(n_images)
        if self.pooled and (owners is None or owners.shape[0] != stats.shape[0]):
            owners = torch.full((stats.shape[0],), NO_OWNER, dtype=torch.long)
        centre_owners = torch.full((m,), NO_OWNER, dtype=torch.long)  # positional: means
        if self.construction == "positional":
            mean = (stats / n).to(torch.float32)  # (D', h, w)
            vectors = mean.flatten(1).transpose(0, 1).contiguous()  # (h*w, D')
            if self.gamma_c > 1:
                vectors, _ = kmeans(vectors, m, seed=self.seed)
        elif self.construction == "kmeans":
            vectors, labels = kmeans(stats.float(), m, seed=self.seed)
            centre_owners = cluster_owners(labels, owners.cpu(), m)
        elif m == stats.shape[0]:  # every patch of the pool: nothing to select
            vectors, centre_owners = stats.float(), owners.cpu()
        else:
            pool = stats.float()
            chosen = greedy_coreset(pool, m, self.seed, self.projection_dim)
            vectors, centre_owners = pool[chosen.to(pool.device)], owners.cpu()[chosen]
        self.centres = vectors.to(self.centres.device, torch.float32).contiguous()  # (M, D')
        self.owners = centre_owners.to(self.centres.device)  # (M,)
        self._start_build(None)  # frees the build's temporaries
        self.fitted.fill_(True)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Older checkpoints carry the retired search's buffers: drop them, so loading stays strict.
        retired = [prefix + name for name in RETIRED_BUFFERS if prefix + name in state_dict]
        for key in retired:
            del state_dict[key]
        if retired:
            log.info("checkpoint from an older version: ignored %s", ", ".join(retired))
        saved = state_dict.get(prefix + "centres")
        resized = saved is not None and saved.dim() == 2 and saved.shape[0] != self.n_centres
        if resized and saved.shape[1] == self.dim:
            # A bank sized by a fraction of the patches: the checkpoint knows its row count.
            self.centres = self.centres.new_zeros(saved.shape)
            self.owners = self.owners.new_full((saved.shape[0],), NO_OWNER)
        if saved is not None and prefix + "owners" not in state_dict:
            # Written before banks knew their owners: no centre is left out of any search.
            state_dict[prefix + "owners"] = torch.full((saved.shape[0],), NO_OWNER)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def most_owned(self) -> int:
        """The most centres any one training image owns: its search has M minus these left."""
        owned = self.owners[self.owners != NO_OWNER]
        return int(torch.unique(owned, return_counts=True)[1].max()) if owned.numel() else 0

    def search_index(self) -> SearchIndex:
        """Centred centres and their squared norms for `distances.nearest`, built once and cached
        until the centres change (a new bank, a loaded checkpoint, a move to a device)."""
        if torch.compiler.is_compiling():  # traced into the graph: (M, D') work, no cache lookup
            return build_index(self.centres)
        key = (self.centres.device, self.centres.data_ptr(), self.centres._version)
        if self._index_cache.get("key") != key:
            self._index_cache = {"key": key, "index": build_index(self.centres)}
        return self._index_cache["index"]
