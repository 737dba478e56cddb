"""Memory bank C, built once from phi's initial output and then frozen (docs/method.md, bank).

How the centres are made is a construction: one `Construction` class each, chosen by its name in
the config group ``model/bank`` (``model.bank.construction``):
- ``positional`` (`Positional`): the exact mean over the training images at every feature-map
  position (h * w centres, the authors' code), optionally compressed by k-means to
  (h * w) // gamma_c;
- ``kmeans`` (`KMeans`): k-means over the patches of all bank images (the paper's text);
- ``coreset`` (`Coreset`): greedy k-center selection over the same patches: the centres are real
  patches, each picked once.
A new construction is one subclass with its own ``name`` and one config file under
conf/model/bank/; `MemoryBank` keeps the build's statistics and the buffers for all of them.

A centre made from one training image's patches alone (a coreset's real patch, a k-means cluster
of one image) is that image's own copy: ``owners`` records the image, and the loss leaves it out
of that image's search (docs/method.md, "own copies"), so adaptation is not pulled back to it.
"""

from __future__ import annotations

import abc
import hashlib
import importlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

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
NO_OWNER = -1  # a centre made from several images (a positional mean, a mixed k-means cluster)


def image_ids(paths: Sequence[str] | None, n: int, device: torch.device | None = None) -> Tensor:
    """(n,) int64 ids of a batch's images: a hash of each path, the same on every rank and in
    every epoch; NO_OWNER where the batch carries no paths."""
    if paths is None:
        return torch.full((n,), NO_OWNER, dtype=torch.long, device=device)
    digests = (hashlib.blake2b(str(p).encode(), digest_size=8).digest() for p in paths)
    ids = [int.from_bytes(d, "little") >> 1 for d in digests]  # 63 bits: a non-negative int64
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


def row_keys(x: Tensor, block_rows: int = 4096) -> Tensor:
    """(N,) int64: a key for every row of x (N, D), equal for equal rows, and for different rows
    different but by a chance of about N^2 / 2^64. Two integer weighted sums of the rows' float32
    bits, each wrapping modulo 2^32: exact in any summation order, so equal rows cannot get
    different keys."""
    seeded = torch.Generator().manual_seed(0x5EED)
    shape = (2, x.shape[1])
    weights = torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, generator=seeded)
    weights = weights.to(x.device)  # (2, D)
    keys = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for start in range(0, x.shape[0], block_rows):
        bits = (x[start : start + block_rows].float() + 0.0).view(torch.int32)  # -0.0 is 0.0
        high, low = ((bits * w).sum(dim=1, dtype=torch.int32).long() for w in weights)
        keys[start : start + block_rows] = (high << 32) | (low & 0xFFFFFFFF)
    return keys


def greedy_coreset(
    x: Tensor, n: int, seed: int = 0, projection_dim: int | None = 128, keys: Tensor | None = None
) -> Tensor:
    """Indices (n,) of a greedy k-center selection from x (N, D): each step takes the point
    farthest from those already chosen, so the chosen points cover x. No point, and no copy of a
    chosen point, is chosen twice (``keys``: `row_keys` of x, computed when not given).

    Distances are measured on a seeded Gaussian random projection to ``projection_dim``
    dimensions (when D is larger), which keeps them within a small factor (Johnson-Lindenstrauss)
    at a fraction of the cost; the selected points themselves keep all D dimensions.
    """
    total = x.shape[0]
    if projection_dim is not None and projection_dim < 1:
        raise ValueError(f"a coreset's projection needs >= 1 dimension, got {projection_dim}")
    keys = row_keys(x) if keys is None else keys.to(x.device)
    distinct = int(torch.unique(keys).numel())
    if not 1 <= n <= distinct:
        raise ValueError(
            f"a coreset needs 1 <= n <= {distinct} distinct points (of {total} points), got {n}"
        )
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
        farthest.masked_fill_(keys == keys[i], float("-inf"))  # z_i and its copies: taken
        i = int(farthest.argmax())
    return chosen


# ---- memory ----------------------------------------------------------------------------------


class Bytes(NamedTuple):
    """Memory on the descriptors' device and in host memory (the same memory on a CPU); None
    where it is not known."""

    device: int | None = 0
    host: int | None = 0


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cgroup_free_bytes(root: str | Path = "/sys/fs/cgroup") -> int | None:
    """What a cgroup v2 memory limit leaves (memory.max less memory.current); None without one."""
    try:
        limit = (Path(root) / "memory.max").read_text().strip()
        used = int((Path(root) / "memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)


def available_memory_bytes() -> int | None:
    """Host memory this process can still get: the system's MemAvailable, or less where a cgroup
    limit leaves less; None where neither can be read."""
    known = [b for b in (_meminfo_available(), cgroup_free_bytes()) if b is not None]
    return min(known, default=None)


def free_memory(device: torch.device) -> Bytes:
    """Free memory on ``device`` (CUDA: free on the card plus what torch's allocator holds
    unused; None on other devices) and in host memory."""
    on_device = None
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        on_device = free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return Bytes(on_device, available_memory_bytes())


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.3g} GiB"


# ---- constructions ---------------------------------------------------------------------------


class Construction(abc.ABC):
    """How a bank's M centres are made from phi's initial output; one subclass per
    ``model.bank.construction``, registered under its ``name`` when it is defined.

    A construction says four things: what the build keeps of each batch (``pools``: a pool of
    patches, or else the float64 sum of every position), the number of centres and whether the
    options allow it (`n_centres`, checked before the build), how the centres come from what was
    kept (`finish`), and what that step needs in memory (`work_bytes`). Options: those of every
    bank config (conf/model/bank/*.yaml) and ``model.gamma_c``; a subclass may take more, which
    its own config file sets.
    """

    name: ClassVar[str] = ""
    pools: ClassVar[bool] = True
    registry: ClassVar[dict[str, type[Construction]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            Construction.registry[cls.name] = cls

    def __init__(
        self, *, size: int | float | None, gamma_c: int, seed: int, projection_dim: int | None
    ) -> None:
        if gamma_c < 1:
            raise ValueError(f"model.gamma_c must be >= 1, got {gamma_c}")
        self.size, self.gamma_c, self.seed = size, gamma_c, seed
        self.projection_dim = projection_dim

    @property
    def size_follows_data(self) -> bool:
        """True when M depends on the bank images (a fraction): a checkpoint brings its own."""
        return False

    @abc.abstractmethod
    def n_centres(self, height: int, width: int, n_patches: int | None = None) -> int | None:
        """M for an (h, w) feature map and ``n_patches`` bank patches (None: not known yet, and
        then None for a size that depends on them). Refuses options that cannot give a bank."""

    @abc.abstractmethod
    def finish(
        self, kept: Tensor, count: Tensor, owners: Tensor | None, m: int
    ) -> tuple[Tensor, Tensor]:
        """The centres (M, D') and their owners (M,) int64 from what the build kept: the pool
        (P, D') float32 with its owners (P,), or the sums (D', h, w) float64 (owners None); count:
        the bank images, () float64."""

    def work_bytes(self, rows: int, dim: int, m: int) -> Bytes:
        """Memory `finish` needs beside what was kept (``rows`` patches or positions of ``dim``
        dims) for m centres."""
        return Bytes(m * dim * 4, 0)


def construction_class(name: str) -> type[Construction]:
    """The construction ``model.bank.construction`` names: a registered name, or the dotted path
    of a Construction subclass outside this package (``package.module.Class``)."""
    if name in Construction.registry:
        return Construction.registry[name]
    found = None
    if isinstance(name, str) and "." in name:
        module, _, attribute = name.rpartition(".")
        try:
            found = getattr(importlib.import_module(module), attribute, None)
        except ImportError:
            found = None
    if isinstance(found, type) and issubclass(found, Construction):
        return found
    raise ValueError(
        f"model/bank={name!r} is not a bank construction; choose one of "
        f"{', '.join(Construction.registry)}, or give a Construction subclass as package.module.Class"
    )


class Positional(Construction):
    """The authors' code: c_(y,x) = (1/n) sum_i phi(x_i)[:, y, x], h * w centres from exact
    float64 sums; ``model.gamma_c`` > 1 clusters them by k-means into (h * w) // gamma_c."""

    name = "positional"
    pools = False

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.size is not None:  # a sweep over constructions and sizes passes it to every job
            log.warning(
                "model.bank.size=%s is ignored by model/bank=positional, whose size is "
                "(h * w) // model.gamma_c",
                self.size,
            )

    def n_centres(self, height, width, n_patches=None):
        m = (height * width) // self.gamma_c
        if m < 1:
            raise ValueError(
                f"model.gamma_c={self.gamma_c} leaves no centres from a {height}x{width} "
                "feature map"
            )
        return m

    def finish(self, kept, count, owners, m):
        mean = (kept / count).to(torch.float32)  # (D', h, w)
        vectors = mean.flatten(1).transpose(0, 1).contiguous()  # (h*w, D'), row-major positions
        if self.gamma_c > 1:
            vectors, _ = kmeans(vectors, m, seed=self.seed)
        return vectors, torch.full((m,), NO_OWNER, dtype=torch.long)  # means copy no one image

    def work_bytes(self, rows, dim, m):
        clustering = rows * (dim * 4 + 16) if self.gamma_c > 1 else 0  # faiss, as in KMeans
        return Bytes(rows * dim * 4 + m * dim * 4, clustering)


class Pooled(Construction):
    """A construction whose centres come from a pool of the bank images' patches, sized by
    ``model.bank.size``: an int, a fraction in (0, 1] of all bank patches, or None (h * w)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        size, gamma_c = self.size, self.gamma_c
        if gamma_c != 1:
            raise ValueError(
                f"model.gamma_c={gamma_c} compresses the positional bank only; with "
                f"model/bank={self.name or type(self).__name__} set model.bank.size instead"
            )
        if size is None:
            return
        if isinstance(size, bool) or not isinstance(size, int | float):
            raise ValueError(f"model.bank.size={size!r}; give a number of centres or a fraction")
        if isinstance(size, int) and size < 1:
            raise ValueError(f"model.bank.size={size} must be >= 1 centre")
        if isinstance(size, float) and not 0 < size <= 1:
            raise ValueError(
                f"model.bank.size={size} is a fraction outside (0, 1]; give a fraction of all bank "
                "patches in (0, 1] or a whole number of centres"
            )

    @property
    def size_follows_data(self) -> bool:
        # a fraction, or a count that a smaller pool caps (`MemoryBank.centres_for`)
        return isinstance(self.size, int | float) and not isinstance(self.size, bool)

    def n_centres(self, height, width, n_patches=None):
        if self.size is None:
            return height * width
        if isinstance(self.size, int):
            return self.size
        return None if n_patches is None else max(1, round(self.size * n_patches))


class KMeans(Pooled):
    """The paper's text: faiss k-means (20 iterations, seeded) over the pool, on the CPU."""

    name = "kmeans"

    def finish(self, kept, count, owners, m):
        vectors, labels = kmeans(kept.float(), m, seed=self.seed)
        return vectors, cluster_owners(labels, owners.cpu(), m)

    def work_bytes(self, rows, dim, m):
        # on the host: faiss's copy, assignments and distances, and its centroids
        return Bytes(m * dim * 4, rows * (dim * 4 + 16) + m * dim * 4)


class Coreset(Pooled):
    """Greedy k-center selection over the pool (`greedy_coreset`): the centres are real patches,
    each picked once, so M may not exceed the pool's distinct patches."""

    name = "coreset"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        projection_dim = self.projection_dim
        whole = isinstance(projection_dim, int) and not isinstance(projection_dim, bool)
        if projection_dim is not None and not (whole and projection_dim >= 1):
            raise ValueError(
                f"model.bank.projection_dim={projection_dim!r}; give a number of dimensions "
                ">= 1 for the coreset's distances, or null to measure them in all D' dimensions"
            )

    def finish(self, kept, count, owners, m):
        pool, owners = kept.float(), owners.cpu()
        keys = row_keys(pool)  # (P,): equal patches, equal keys
        distinct = int(torch.unique(keys).numel())
        if m > distinct and isinstance(self.size, int):  # a count is at most: every patch once
            log.info(
                "model.bank.size=%d: the pool holds %d distinct patches, each a centre", m, distinct
            )
            m = distinct
        if m > distinct:
            raise ValueError(
                f"model.bank.size={self.size} asks for {m} centres, but the pool holds only "
                f"{distinct} distinct patches (of {pool.shape[0]}); a coreset takes each patch "
                f"once: lower model.bank.size to at most {distinct}"
            )
        if m == pool.shape[0]:  # every patch of the pool: nothing to select
            return pool, owners
        chosen = greedy_coreset(pool, m, self.seed, self.projection_dim, keys)
        return pool[chosen.to(pool.device)], owners[chosen]

    def work_bytes(self, rows, dim, m):
        dims = min(dim, self.projection_dim or dim)
        # its projection and the product's, distances; the patches' keys; the centres
        return Bytes(rows * ((2 * dims + 2) * 4 + 8) + m * dim * 4, 0)


CONSTRUCTIONS = tuple(Construction.registry)  # this package's own: positional, kmeans, coreset


def bank_size(
    size: int | float | None,
    construction: str,
    height: int,
    width: int,
    gamma_c: int = 1,
    n_patches: int | None = None,
) -> int | None:
    """Number of centres M that ``construction`` gives with these options (None when a fraction
    is given and n_patches is not known yet); ValueError for options that give no bank."""
    maker = construction_class(construction)(
        size=size, gamma_c=gamma_c, seed=0, projection_dim=None
    )  # seed and projection do not change the count
    return maker.n_centres(height, width, n_patches)


# ---- the bank --------------------------------------------------------------------------------


class MemoryBank(nn.Module):
    """Holds C as a buffer (its row count is restored from checkpoints), and what a build keeps
    until the construction (``strategy``) finishes the centres.

    While it is built: for a construction that pools, a seeded random sample of each image's
    patches (all of them while the pool stays within ``max_patches``) is kept as the pool the
    centres come from; otherwise float64 sums and a count make the mean of every position exact
    for any batch sizes. These are plain tensors, not buffers: nothing for DDP to broadcast,
    nothing in checkpoints. The settings have no defaults here: the bank group
    (conf/model/bank/*.yaml) and conf/model/cfa.yaml (gamma_c, kmeans_seed) hold them.
    """

    def __init__(
        self,
        dim: int,
        height: int,
        width: int,
        *,
        construction: str,
        size: int | float | None,
        gamma_c: int,
        seed: int,
        max_patches: int,
        projection_dim: int | None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.dim, self.height, self.width = dim, height, width
        self.construction, self.seed = construction, seed  # construction: the config's name
        self.strategy = construction_class(construction)(
            size=size, gamma_c=gamma_c, seed=seed, projection_dim=projection_dim, **options
        )
        if isinstance(max_patches, bool) or not isinstance(max_patches, int) or max_patches < 1:
            raise ValueError(f"model.bank.max_patches={max_patches!r}; give a count >= 1")
        self.max_patches = max_patches
        n_centres = self.strategy.n_centres(height, width)  # M; None: a fraction, not known yet
        self.register_buffer("centres", torch.zeros(n_centres or height * width, dim))  # (M, D')
        self.register_buffer("fitted", torch.tensor(False))
        # (M,) int64: the training image each centre copies, NO_OWNER if none (see the docstring)
        self.register_buffer("owners", torch.full((self.centres.shape[0],), NO_OWNER))
        self._index_cache: dict = {}
        self._owned_cache: dict = {}
        self.reset()

    @property
    def size(self) -> int | float | None:
        """model.bank.size as configured."""
        return self.strategy.size

    @property
    def n_centres(self) -> int:
        return self.centres.shape[0]

    @property
    def pooled(self) -> bool:
        """True when the centres come from a pool of patches (kmeans, coreset)."""
        return self.strategy.pools

    def patches_per_image(self, n_images: int) -> int:
        """How many patches of each image the pool keeps: all of them (h * w) unless that would
        pass max_patches over ``n_images`` images."""
        return max(1, min(self.height * self.width, self.max_patches // max(n_images, 1)))

    def pool_size(self, n_images: int) -> int:
        """Patches in the pool that ``n_images`` images give: the most centres a build can take."""
        return n_images * self.patches_per_image(n_images)

    def kept_rows(self, n_images: int) -> int:
        """The rows a build of ``n_images`` images keeps: its pool, or the h * w positions."""
        return self.pool_size(n_images) if self.pooled else self.height * self.width

    def centres_for(self, n_images: int) -> int:
        """M for a bank built from ``n_images`` images, checked against what the build keeps."""
        n_patches = n_images * self.height * self.width
        m = self.strategy.n_centres(self.height, self.width, n_patches)
        kept = self.kept_rows(n_images)
        if m > kept and self.pooled and isinstance(self.size, int):
            # A count is the most centres: a smaller data set gives every patch it keeps.
            log.info(
                "model.bank.size=%d is more than the %d patches that %d bank images give: every "
                "patch is a centre",
                m,
                kept,
                n_images,
            )
            return kept
        if m > kept:
            raise ValueError(
                f"model.bank.size={self.size} asks for {m} centres, but the {n_images} bank images "
                f"give {n_patches} patches of which the build keeps {kept} "
                f"(model.bank.max_patches={self.max_patches}); the largest valid size is {kept} "
                f"(or {kept / n_patches:.4g} as a fraction)"
            )
        return m

    # ---- memory of a build -------------------------------------------------------------------

    def build_phases(
        self, n_images: int, world: int = 1, rank: int = 0, cache_bytes: int = 0
    ) -> list[Bytes]:
        """Estimated memory at each peak of a build of ``n_images`` images on ``rank`` of
        ``world``, besides the model and the backbone's working memory over one batch: phi's pass
        (what it keeps, beside a tap cache of ``cache_bytes`` filling on the same device), then
        on rank 0, which alone finishes the bank, the gathered pool and the selection."""
        m = self.centres_for(n_images)
        rows, share = self.kept_rows(n_images), len(range(rank, n_images, world))
        if self.pooled:
            quota = self.patches_per_image(n_images)
            whole, local = rows * self.dim * 4, share * quota * self.dim * 4  # float32 pools
            owners, local_owners = rows * 8, share * quota * 8  # int64, on the host
            phases = [Bytes(cache_bytes + 2 * local, local_owners)]  # batches, then joined
            if rank == 0 and world > 1:  # this rank's pool beside the whole being received
                phases.append(Bytes(cache_bytes + local + whole, local_owners + owners))
        else:
            whole, owners = rows * self.dim * 8, 0  # float64 sums, summed in place
            phases = [Bytes(cache_bytes + whole, 0)]
        if rank == 0:
            work = self.strategy.work_bytes(rows, self.dim, m)
            phases.append(Bytes(cache_bytes + whole + work.device, owners + work.host))
        return phases

    def build_bytes(
        self, n_images: int, world: int = 1, rank: int = 0, cache_bytes: int = 0
    ) -> int:
        """The peak of `build_phases` where the device's memory is the host's (a CPU build)."""
        return max(p.device + p.host for p in self.build_phases(n_images, world, rank, cache_bytes))

    def memory_problem(
        self,
        n_images: int,
        device: torch.device | str,
        world: int = 1,
        rank: int = 0,
        cache_bytes: int = 0,
        free: Bytes | None = None,
    ) -> str | None:
        """Why a build of ``n_images`` images on ``rank`` of ``world`` would run out of memory
        (None if it fits): its estimate (`build_phases`) against ``free`` (measured when None),
        on ``device`` and in host memory."""
        device, phases = torch.device(device), self.build_phases(n_images, world, rank, cache_bytes)
        free = free_memory(device) if free is None else free
        if device.type == "cuda":
            peak_device, peak_host = max(p.device for p in phases), max(p.host for p in phases)
            checks = [
                (f"memory on {device}", peak_device, free.device),
                ("host memory", peak_host, free.host),
            ]
        else:  # the pool, the tap cache and the selection share the host's memory
            checks = [("memory", self.build_bytes(n_images, world, rank, cache_bytes), free.host)]
        for where, need, available in checks:
            if available is None or need <= available:
                continue
            size = "null" if self.size is None else self.size
            kept = (
                f"a pool of {self.pool_size(n_images)} patches of {self.dim} dims"
                if self.pooled
                else f"the sums of {self.height}x{self.width} positions of {self.dim} dims"
            )
            taps = ""
            if cache_bytes:
                taps = f" and up to {_gib(cache_bytes)} of taps (model.tap_cache_mb)"
            on_rank = f" on rank {rank} of {world}" if world > 1 else ""
            return (
                f"building the {self.construction} bank needs about {_gib(need)} of {where} for "
                f"{self.centres_for(n_images)} centres (model.bank.size={size}) from {kept}{taps}, "
                f"but only {_gib(available)} is available{on_rank}; lower model.bank.max_patches "
                "or model.tap_cache_mb, or model.gamma_d or data.image_size"
            )
        return None

    # ---- the build ---------------------------------------------------------------------------

    def reset(self, n_images: int | None = None) -> None:
        """Start a build of ``n_images`` images in all (all ranks), which sets the per-image quota
        of the pool (None: keep every patch)."""
        self._start_build(n_images)
        self.fitted.fill_(False)

    def _start_build(self, n_images: int | None) -> None:
        self._sum: Tensor | None = None  # no pool: (D', h, w) float64
        self._count: Tensor | None = None  # () float64
        self._pool: list[Tensor] = []  # a pool: [(n, D') float32]
        self._pool_owners: list[Tensor] = []  # the image of each pooled patch: [(n,) int64]
        self._quota = (
            self.height * self.width if n_images is None else self.patches_per_image(n_images)
        )
        self._gen = torch.Generator(device="cpu").manual_seed(self.seed)

    def drop_statistics(self) -> None:
        """Let go of what the build kept, once a caller has taken it (`statistics`)."""
        self._start_build(None)

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
                draws = [torch.randperm(hw, generator=self._gen)[: self._quota] for _ in range(b)]
                keep = torch.stack(draws)  # (B, quota)
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
        """What this process has seen since the last reset: (the pool (P, D') float32, or the
        sums (D', h, w) float64; and the image count () float64)."""
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
            shape = (self.dim, self.height, self.width)
            sums = torch.zeros(shape, dtype=torch.float64, device=device)  # (D', h, w)
            return sums, count
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
        """Centres from the statistics of the whole build (`statistics`, gathered over ranks by a
        distributed caller; None: this process's own), and each centre's owner from the pool's
        (`pool_owners`, gathered like the pool)."""
        if stats is None or count is None:  # a single process: its own statistics
            stats, count = self.statistics()
            owners = self.pool_owners()
        n_images = int(count)
        if n_images < 1:
            raise RuntimeError("memory bank has seen no training image; is the train split empty?")
        m = self.centres_for(n_images)
        if self.pooled and (owners is None or owners.shape[0] != stats.shape[0]):
            owners = torch.full((stats.shape[0],), NO_OWNER, dtype=torch.long)
        self.assign(*self.strategy.finish(stats, count, owners, m))

    @torch.no_grad()
    def assign(self, centres: Tensor, owners: Tensor) -> None:
        """Take finished centres (M, D') and their owners (M,) (from `finalize`, or from the rank
        that built them), and let go of the build's statistics."""
        self.centres = centres.to(self.centres.device, torch.float32).contiguous()  # (M, D')
        self.owners = owners.to(self.centres.device, torch.long)  # (M,)
        self.drop_statistics()
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
            capped = isinstance(self.size, int) and not isinstance(self.size, bool)
            if not self.strategy.size_follows_data or (capped and saved.shape[0] > self.size):
                raise ValueError(
                    f"the checkpoint's memory bank has {saved.shape[0]} centres, but this "
                    f"model's {self.construction} bank has {self.n_centres}: the checkpoint was "
                    "trained at another data.image_size or model.bank.size (or model.gamma_c); "
                    "use the settings it was trained with, or train a new model"
                )
            # A bank sized by the data (a fraction, or a count its pool capped): the checkpoint
            # knows its row count.
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

    def has_owners(self) -> bool:
        """Whether any centre is one image's own copy; read once per bank, not per training step
        (a host read), and again when the owners change (a build, a loaded checkpoint)."""
        key = (self.owners.device, self.owners.data_ptr(), self.owners._version)
        if self._owned_cache.get("key") != key:
            self._owned_cache = {"key": key, "owned": bool((self.owners != NO_OWNER).any())}
        return self._owned_cache["owned"]

    def search_index(self) -> SearchIndex:
        """Centred centres and their squared norms for `distances.nearest`, built once and cached
        until the centres change (a new bank, a loaded checkpoint, a move to a device)."""
        if torch.compiler.is_compiling():  # traced into the graph: (M, D') work, no cache lookup
            return build_index(self.centres)
        key = (self.centres.device, self.centres.data_ptr(), self.centres._version)
        if self._index_cache.get("key") != key:
            self._index_cache = {"key": key, "index": build_index(self.centres)}
        return self._index_cache["index"]
