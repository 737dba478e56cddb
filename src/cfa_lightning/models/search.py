"""Exact k-nearest-centre search: cheap distances for all centres, exact ones for a few, a certificate.

Cheap approximations of d(p, c) = ||p - c||^2 rank or rule out centres:

- the group lower bound (||p - mu_g|| - r_g)^2 for every centre of a group (pruned search, below);
- the projected lower bound L = ||W^T (p - c)||^2 <= sigma^2 d, with W the top principal directions of
  the bank's centres (sigma = ||W||_2, 1 up to rounding); k << D' dims make it cheap;
- the dense expanded form ||x||^2 + ||y||^2 - 2 x.y (x = p - mu, y = c - mu), whose error under
  TF32/bf16 matmuls, or plain float32 cancellation, can reach the size of the nearest distances.

The certificate (`_certify`), per patch: take the `c` centres with the smallest approximate value,
compute their exact float32 distances as direct differences (no cancellation), let delta be the
k-th smallest, and accept if every other centre's approximate value exceeds a threshold tau(delta)
that accounts for all rounding. Then no centre outside the candidates can be among the k nearest,
and the answer is brute force's, up to exact ties. Patches that fail get 4x the candidates, up to
all centres, where every distance is exact. The returned distances are always direct differences.

Pruned (`_pruned_chunk`, `model.prune=true`): the centres are grouped by k-means once, when the
bank is built. Patches whose nearest group mean is the same form a block, and per block:
1. the patches' exact-bounded distances to their own group give delta_up, an upper bound on each
   patch's k-th distance;
2. the triangle inequality ||p - c|| >= ||p - mu_g|| - r_g (r_g the group's radius) drops every
   group that no patch of the block can reach within delta_up;
3. the projected bound drops, among the centres left, those that no patch can reach;
4. the dense certified search runs on the centres that remain (one matrix product per block).
A block left with over `max_fraction` of the centres runs dense. The projected bound alone needs
an (n, M) pass whose write, top-k and compare cost about as much as the dense product on a CPU;
the groups bound all centres at an (n, G) cost first.

Rounding slack (u = 2^-24, u_mm = the matmul's unit roundoff: 2^-24, TF32 2^-11, bf16 2^-8,
gamma(n) = n u / (1 - n u), a dot product of length n: |fl(a.b) - a.b| <= c_mm(n) ||a|| ||b|| with
c_mm(n) = 2 u_mm + u_mm^2 + gamma(n)):
- exact distances: d_hat = fl(sum (p_i - c_i)^2) = d (1 + t), |t| <= gamma(D' + 2), so the true
  k-th distance is at most delta_up = delta_hat (1 + 2 gamma(D' + 2)).
- dense expanded form: |d_tilde - d| <= eps = (c_mm(D') + gamma(D' + 6)) (||x_hat|| + Y)^2, Y =
  max ||y||; the 6 covers the two norms, the additions and the rounding of x = p - mu.
  Certified when d_tilde - eps > delta_up for every non-candidate.
- group bound: d_g = ||x_hat - fl(mu_g - mu)||^2 in the expanded form is off by at most eps_G =
  (c_mm(D') + gamma(D' + 6)) (||x_hat|| + Y_g)^2, Y_g = max ||fl(mu_g - mu)||; r_g is measured in
  float64 from that same group point. A group is out if (sqrt(d_g - eps_G) - r_g)^2 > delta_up.
- projected bound: q = fl(W^T x) is off from W^T x by at most sigma (sqrt(k) c_mm(D') + 2u) ||x_hat||
  (+ 3 u sigma Y for the stored projected centres), call that eps_q; the expanded form in k dims
  adds eps_g = gamma(k + 4) (||q|| + Q)^2, Q = max ||q_c||. From ||W^T(p - c)|| >= sqrt(L_hat -
  eps_g) - eps_q and ||W^T(p - c)|| <= sigma sqrt(d): a centre is out if
  L_hat > (sigma sqrt(delta_up) + eps_q)^2 + eps_g.
- delta_up from the own group's expanded form: the k-th smallest d_tilde plus eps (the dense one).
Thresholds are evaluated in float64, so comparing them with the float32 values adds no rounding.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

U32 = 2.0**-24  # unit roundoff of float32
GROWTH = 4  # candidates multiply by this for the rows that fail the certificate


def gamma(n: int, u: float = U32) -> float:
    """Higham's gamma_n = n u / (1 - n u): relative error bound of an n-term float sum."""
    return n * u / (1.0 - n * u)


def matmul_unit_roundoff(device: torch.device) -> float:
    """Unit roundoff of a float32 matmul as torch is configured: TF32 and bf16 passes drop bits."""
    precision = torch.get_float32_matmul_precision()
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        precision = "high" if precision == "highest" else precision
    return {"highest": U32, "high": 2.0**-11, "medium": 2.0**-8}.get(precision, 2.0**-8)


def dot_error(n: int, u_mm: float) -> float:
    """c_mm(n): |fl(a.b) - a.b| <= c_mm(n) ||a|| ||b|| for length-n float32 inputs."""
    return 2 * u_mm + u_mm * u_mm + gamma(n)


class CentreGroups(NamedTuple):
    """A partition of the centres for the triangle-inequality bound (`memory_bank.build_groups`)."""

    group_of: Tensor  # (M,) group of each centre, 0..G-1
    members: tuple[Tensor, ...]  # G index tensors
    centred: Tensor  # (G, D') fl(mu_g - mu)
    centred_sq: Tensor  # (G,)
    centred_max: float  # Y_g = max ||fl(mu_g - mu)||
    radius: Tensor  # (G,) float64 r_g = max ||c - mu_g|| over the group's centres


class SearchIndex(NamedTuple):
    """What the search needs from a memory bank (see `MemoryBank.search_index`)."""

    centres: Tensor  # (M, D') float32, for the exact direct differences
    mean: Tensor  # (D',) mu, subtracted from patches and centres before any expanded form
    centred: Tensor  # (M, D') y = c - mu
    centred_sq: Tensor  # (M,) ||y||^2
    centred_max: float  # Y = max ||y||
    groups: CentreGroups | None  # None for the dense search
    basis: Tensor | None  # (D', k) W, or None: no projected bound
    projected: Tensor | None  # (M, k) W^T y
    projected_sq: Tensor | None  # (M,) ||W^T y||^2
    projected_max: float  # Q = max ||W^T y||
    sigma: float  # ||W||_2 of the stored basis (>= 1)


class SearchStats(NamedTuple):
    """What the last search did: patches, exact distances computed, patches that went dense."""

    patches: int
    centres: int
    checked: int
    dense_patches: int

    @property
    def checked_fraction(self) -> float:
        return self.checked / max(self.patches * self.centres, 1)

    @property
    def pruned_fraction(self) -> float:
        return 1.0 - self.checked_fraction

    @property
    def dense_fraction(self) -> float:
        return self.dense_patches / max(self.patches, 1)


class SearchResult(NamedTuple):
    values: Tensor  # (N, k) exact squared distances, ascending
    indices: Tensor  # (N, k) centre indices
    stats: SearchStats


def exact_sq_distances(
    p: Tensor, centres: Tensor, idx: Tensor, budget_bytes: int | None = None
) -> Tensor:
    """||p_n - c_idx[n, j]||^2 as direct differences in float32: (n, D'), (n, c) -> (n, c)."""
    if budget_bytes is None:  # one expression, no loop: traceable with a dynamic batch
        gathered = centres.index_select(0, idx.reshape(-1)).view(idx.shape[0], idx.shape[1], -1)
        return (p.unsqueeze(1) - gathered).square().sum(dim=-1)
    n, c = idx.shape
    out = torch.empty(n, c, dtype=torch.float32, device=p.device)
    step = max(1, budget_bytes // (8 * max(c * p.shape[1], 1)))
    for s in range(0, n, step):
        rows = idx[s : s + step]
        gathered = centres.index_select(0, rows.reshape(-1)).view(*rows.shape, -1)  # (n, c, D')
        diff = p[s : s + step].unsqueeze(1) - gathered
        out[s : s + step] = diff.square_().sum(dim=-1)
    return out


def _certify(approx, p, centres, k, first, limit, threshold, budget_bytes):
    """The candidates + certificate loop on one block.

    approx (n, M): cheap values that rank the centres (offset per row is allowed: the threshold is
    in the same units). threshold(delta_hat, rows) -> (r,) float64: a centre whose approximate value
    exceeds it cannot be closer than delta. Returns values, indices, exact distances computed per
    row, and the rows still uncertified once `limit` candidates were tried.
    """
    n, m = approx.shape
    values = torch.empty(n, k, dtype=torch.float32, device=p.device)
    indices = torch.empty(n, k, dtype=torch.int64, device=p.device)
    checked = 0
    rows = torch.arange(n, device=p.device)
    c = min(max(first, k), m)
    while True:
        a = approx if rows.numel() == n else approx[rows]
        bound, cand = torch.topk(a, c, dim=1, largest=False, sorted=False)  # (r, c)
        d = exact_sq_distances(p[rows], centres, cand, budget_bytes)  # (r, c)
        v, j = torch.topk(d, k, dim=1, largest=False, sorted=True)
        checked += rows.numel() * c
        if c >= m:  # every centre has its exact distance
            ok = torch.ones(rows.numel(), dtype=torch.bool, device=p.device)
        else:  # every non-candidate has an approximate value >= the candidates' largest
            ok = bound.amax(dim=1).double() > threshold(v[:, k - 1], rows)
        done = rows[ok]
        values[done] = v[ok]
        indices[done] = cand[ok].gather(1, j[ok])
        rows = rows[~ok]
        if rows.numel() == 0 or c >= limit:
            return values, indices, checked, rows
        c = min(c * GROWTH, m)


def _delta_up(delta_hat: Tensor, dim: int) -> Tensor:
    """Upper bound on the true k-th distance from its float32 direct-difference value."""
    return delta_hat.double() * (1.0 + 2.0 * gamma(dim + 2))


def dense_slack(x_norm: Tensor, centred_max: float, dim: int, u_mm: float) -> Tensor:
    """eps (n,) float64: the expanded form's error bound |d_tilde - d| for patches with ||x_hat||
    = x_norm against points y with ||y|| <= centred_max."""
    coef = dot_error(dim, u_mm) + gamma(dim + 6)
    return coef * (x_norm.double() + centred_max) ** 2


def projected_threshold(
    delta_up: Tensor, x_norm: Tensor, q_sq: Tensor, index: SearchIndex, dim: int, u_mm: float
) -> Tensor:
    """tau (n,) float64: a centre whose computed projected bound L_hat exceeds tau is farther than
    delta_up, an upper bound on the patch's k-th distance. tau - delta_up is the rounding slack."""
    sigma, dims = index.sigma, index.basis.shape[1]
    eps_q = sigma * (
        (math.sqrt(dims) * dot_error(dim, u_mm) + 2 * U32) * x_norm.double()
        + 3 * U32 * index.centred_max
    )
    eps_g = gamma(dims + 4) * (q_sq.double().sqrt() + index.projected_max) ** 2
    return (sigma * delta_up.double().sqrt() + eps_q) ** 2 + eps_g


def _dense_block(
    p, index: SearchIndex, k, budget_bytes, u_mm, cols: Tensor | None = None, out=None
):
    """Expanded form in the matmul's precision, then the certificate; exact for every row.

    cols: restrict the search to these centres (the ones a projected bound could not rule out).
    """
    centred, centred_sq, centres = index.centred, index.centred_sq, index.centres
    if cols is not None:
        centred, centred_sq = centred.index_select(0, cols), centred_sq.index_select(0, cols)
        centres = centres.index_select(0, cols)
    x = p - index.mean  # (n, D')
    x_sq = x.square().sum(dim=1)  # (n,)
    # d_tilde - ||x||^2 (n, M); `out` is a buffer reused by every block: no fresh pages per block
    approx = torch.addmm(centred_sq.unsqueeze(0), x, centred.t(), alpha=-2.0, out=out)
    dim = p.shape[1]
    eps = dense_slack(x_sq.sqrt(), index.centred_max, dim, u_mm)  # (n,)

    def threshold(delta_hat, rows):
        return _delta_up(delta_hat, dim) + eps[rows] - x_sq[rows].double()

    # A margin of extra candidates: a few in float32, more where TF32/bf16 may misrank.
    first = k + 4 if u_mm <= U32 else 2 * k + 8
    m = approx.shape[1]
    values, indices, _, left = _certify(approx, p, centres, k, first, m, threshold, budget_bytes)
    assert left.numel() == 0  # with all M candidates every row is certified
    if cols is not None:
        indices = cols[indices]
    return values, indices, p.shape[0] * m  # the expanded form is a full-cost look at every centre


def _pruned_chunk(p, index: SearchIndex, k, max_fraction, budget_bytes, u_mm):
    """Group and projected bounds rule out centres per block of patches that share their nearest
    group; the certified dense search runs on the rest. Returns values, indices, checked, and
    the number of patches that ran dense."""
    groups, m, dim = index.groups, index.centres.shape[0], p.shape[1]
    x = p - index.mean  # (n, D')
    to_group = torch.addmm(groups.centred_sq.unsqueeze(0), x, groups.centred.t(), alpha=-2.0)
    nearest_group = to_group.argmin(dim=1)
    # Patches sorted by nearest group: every block below is a slice, not a gather.
    order = torch.argsort(nearest_group, stable=True)
    counts = torch.bincount(nearest_group, minlength=len(groups.members)).tolist()
    p, x, to_group = p[order], x[order], to_group[order]
    x_sq = x.square().sum(dim=1)
    x_norm = x_sq.double().sqrt()
    eps = dense_slack(x_norm, index.centred_max, dim, u_mm)  # the centres' expanded form
    # The triangle inequality's lower bound on d(p, c) for the centres of each group (n, G).
    d_group = to_group.double() + x_sq.double().unsqueeze(1)
    d_group -= dense_slack(x_norm, groups.centred_max, dim, u_mm).unsqueeze(1)
    reach = (d_group.clamp_min(0).sqrt() - groups.radius.unsqueeze(0)).clamp_min(0).square()
    if index.basis is not None:
        q = x @ index.basis  # (n, k')
        q_sq = q.square().sum(dim=1)
    n = p.shape[0]
    values = torch.empty(n, k, dtype=torch.float32, device=p.device)
    indices = torch.empty(n, k, dtype=torch.int64, device=p.device)
    checked, dense, start = 0, [], 0
    for count, own in zip(counts, groups.members, strict=True):
        rows, start = slice(start, start + count), start + count
        if count == 0:
            continue
        delta_up = torch.full((count,), math.inf, dtype=torch.float64, device=p.device)
        if own.numel() >= k:  # upper bound on the k-th distance from the own group, exactly bounded
            approx = torch.addmm(index.centred_sq[own].unsqueeze(0), x[rows],
                                 index.centred[own].t(), alpha=-2.0)  # fmt: skip
            delta_up = approx.kthvalue(k, dim=1).values.double() + x_sq[rows].double() + eps[rows]
        keep = (reach[rows] <= delta_up.unsqueeze(1)).any(dim=0)  # (G,) groups some patch reaches
        cols = keep[groups.group_of].nonzero().flatten()  # (c,) their centres
        if index.basis is not None and cols.numel() > k:
            tau = projected_threshold(delta_up, x_norm[rows], q_sq[rows], index, dim, u_mm)
            limit32 = (tau - q_sq[rows].double()).float()  # rounded up: no centre dropped by it
            limit32 = torch.nextafter(limit32, torch.full_like(limit32, math.inf))
            reached = torch.zeros(cols.numel(), dtype=torch.bool, device=p.device)
            step = block_rows(cols.numel(), dim, budget_bytes)  # (cols, rows) within the budget
            for s in range(rows.start, rows.stop, step):
                part = slice(s, min(rows.stop, s + step))
                bound = torch.addmm(index.projected_sq[cols].unsqueeze(1), index.projected[cols],
                                    q[part].t(), alpha=-2.0)  # fmt: skip
                below = bound <= limit32[s - rows.start : part.stop - rows.start].unsqueeze(0)
                reached |= below.any(dim=1)
            cols = cols[reached]
        if cols.numel() > max_fraction * m or cols.numel() < k:  # too many left: dense, below
            dense.append(rows)
            continue
        step = block_rows(cols.numel(), dim, budget_bytes)
        for s in range(rows.start, rows.stop, step):
            part = slice(s, min(rows.stop, s + step))
            found = _dense_block(p[part], index, k, budget_bytes, u_mm, cols)
            values[part], indices[part], c = found
            checked += c
    if dense:  # the blocks that went dense, together: large products, few calls
        rows = torch.cat([torch.arange(r.start, r.stop, device=p.device) for r in dense])
        step = block_rows(m, dim, budget_bytes)
        for s in range(0, rows.numel(), step):
            part = rows[s : s + step]
            values[part], indices[part], c = _dense_block(p[part], index, k, budget_bytes, u_mm)
            checked += c
    out_v, out_i = torch.empty_like(values), torch.empty_like(indices)
    out_v[order], out_i[order] = values, indices
    dense_rows = sum(r.stop - r.start for r in dense)
    return out_v, out_i, checked, dense_rows


def block_rows(n_centres: int, dim: int, budget_bytes: int) -> int:
    """Patches per block: their (n, M) approximate values and small temporaries fit the budget."""
    return max(1, budget_bytes // (4 * (max(n_centres, 1) + 2 * dim)))


@torch.no_grad()
def nearest(
    p: Tensor,
    index: SearchIndex,
    k: int,
    budget_bytes: int | None,
    max_fraction: float = 0.5,
) -> SearchResult:
    """The k nearest centres of every patch, exact: values ascending (N, k) and indices (N, k).

    Pruned when `index.groups` is set, dense otherwise; a pruned block left with over
    `max_fraction` of the centres runs dense. `budget_bytes=None`: one loop-free block for
    export: the expanded form ranks, the k winners are recomputed as direct differences, without
    a certificate.
    """
    m = index.centres.shape[0]
    if k > m:
        raise ValueError(
            f"need {k} nearest centres but the memory bank holds only {m}; "
            "lower model.gamma_c or model.K / model.J"
        )
    with torch.autocast(device_type=p.device.type, enabled=False):
        p = p.float()
        n = p.shape[0]
        if budget_bytes is None:
            x = p - index.mean
            approx = torch.addmm(index.centred_sq.unsqueeze(0), x, index.centred.t(), alpha=-2.0)
            idx = torch.topk(approx, k, dim=1, largest=False, sorted=False).indices
            d = exact_sq_distances(p, index.centres, idx)
            v, j = torch.sort(d, dim=1)
            return SearchResult(v, idx.gather(1, j), SearchStats(n, m, n * m, n))
        u_mm = matmul_unit_roundoff(p.device)
        values = torch.empty(n, k, dtype=torch.float32, device=p.device)
        indices = torch.empty(n, k, dtype=torch.int64, device=p.device)
        checked, dense_rows = 0, 0
        if index.groups is not None:
            # Per chunk: (n, G) group distances and bounds, (n, k') projections; blocks inside.
            width = len(index.groups.members) * 3 + (
                index.basis.shape[1] if index.basis is not None else 0
            )
            step = max(1, budget_bytes // (8 * (width + p.shape[1])))
            for s in range(0, n, step):
                v, i, c, d = _pruned_chunk(
                    p[s : s + step], index, k, max_fraction, budget_bytes, u_mm
                )
                values[s : s + step], indices[s : s + step] = v, i
                checked, dense_rows = checked + c, dense_rows + d
            return SearchResult(values, indices, SearchStats(n, m, checked, dense_rows))
        step = block_rows(m, p.shape[1], budget_bytes)
        buffer = torch.empty(min(step, n), m, device=p.device)
        for s in range(0, n, step):
            rows = p[s : s + step]
            found = _dense_block(rows, index, k, budget_bytes, u_mm, out=buffer[: rows.shape[0]])
            values[s : s + step], indices[s : s + step], c = found
            checked += c
        dense_rows = n
    return SearchResult(values, indices, SearchStats(n, m, checked, dense_rows))
