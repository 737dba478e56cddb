"""Exact k-nearest-centre search: cheap distances for all centres, exact ones for a few, a certificate.

One mechanism serves two cheap approximations of d(p, c) = ||p - c||^2:

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

Pruned (`_pruned_block`): for a block of neighbouring patches, projected bounds of all centres; a
first delta per patch from its 2k best-bounded centres, measured exactly; the centres whose bound
exceeds tau(delta) for every patch of the block are dropped, and the dense expanded form with the
certificate runs on the others (a large matrix product, not a gather per patch).

Rounding slack (u = 2^-24, u_mm = the matmul's unit roundoff: 2^-24, TF32 2^-11, bf16 2^-8,
gamma(n) = n u / (1 - n u), a dot product of length n: |fl(a.b) - a.b| <= c_mm(n) ||a|| ||b|| with
c_mm(n) = 2 u_mm + u_mm^2 + gamma(n)):
- exact distances: d_hat = fl(sum (p_i - c_i)^2) = d (1 + t), |t| <= gamma(D' + 2), so the true
  k-th distance is at most delta_up = delta_hat (1 + 2 gamma(D' + 2)).
- dense expanded form: |d_tilde - d| <= eps = (c_mm(D') + gamma(D' + 6)) (||x_hat|| + Y)^2, Y =
  max ||y||; the 6 covers the two norms, the additions and the rounding of x = p - mu.
  Certified when d_tilde - eps > delta_up for every non-candidate.
- projected bound: q = fl(W^T x) is off from W^T x by at most sigma (sqrt(k) c_mm(D') + 2u) ||x_hat||
  (+ 3 u sigma Y for the stored projected centres), call that eps_q; the expanded form in k dims
  adds eps_g = gamma(k + 4) (||q|| + Q)^2, Q = max ||q_c||. From ||W^T(p - c)|| >= sqrt(L_hat -
  eps_g) - eps_q and ||W^T(p - c)|| <= sigma sqrt(d): a centre is out if
  L_hat > (sigma sqrt(delta_up) + eps_q)^2 + eps_g.
Thresholds are evaluated in float64, so comparing them with the float32 values adds no rounding.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

U32 = 2.0**-24  # unit roundoff of float32
GROWTH = 4  # candidates multiply by this for the rows that fail the certificate
PRUNED_BLOCK = 64  # patches per pruned block: neighbours share candidates, so few centres stay


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


class SearchIndex(NamedTuple):
    """What the search needs from a memory bank (see `MemoryBank.search_index`)."""

    centres: Tensor  # (M, D') float32, for the exact direct differences
    mean: Tensor  # (D',) mu, subtracted from patches and centres before any expanded form
    centred: Tensor  # (M, D') y = c - mu
    centred_sq: Tensor  # (M,) ||y||^2
    centred_max: float  # Y = max ||y||
    basis: Tensor | None  # (D', k) W, or None for the dense search
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


def dense_slack(x_norm: Tensor, index: SearchIndex, dim: int, u_mm: float) -> Tensor:
    """eps (n,): the expanded form's error bound |d_tilde - d| for patches with ||x_hat|| = x_norm."""
    coef = dot_error(dim, u_mm) + gamma(dim + 6)
    return coef * (x_norm.double() + index.centred_max) ** 2


def projected_threshold(
    delta_hat: Tensor, x_norm: Tensor, q_sq: Tensor, index: SearchIndex, dim: int, u_mm: float
) -> Tensor:
    """tau (n,) float64: a centre whose computed projected bound L_hat exceeds tau is farther than
    the patch's k-th distance delta (computed delta_hat). tau - delta_hat is the rounding slack."""
    sigma, dims = index.sigma, index.basis.shape[1]
    eps_q = sigma * (
        (math.sqrt(dims) * dot_error(dim, u_mm) + 2 * U32) * x_norm.double()
        + 3 * U32 * index.centred_max
    )
    eps_g = gamma(dims + 4) * (q_sq.double().sqrt() + index.projected_max) ** 2
    return (sigma * _delta_up(delta_hat, dim).sqrt() + eps_q) ** 2 + eps_g


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
    eps = dense_slack(x_sq.sqrt(), index, dim, u_mm)  # (n,)

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


def _pruned_block(p, index: SearchIndex, k, max_fraction, budget_bytes, u_mm):
    """Projected lower bounds rule out centres for the whole block; the dense certified search
    runs on the rest. Returns None when too many centres remain for pruning to pay."""
    x = p - index.mean  # (n, D')
    q = x @ index.basis  # (n, k')
    q_sq = q.square().sum(dim=1)
    bounds = torch.addmm(index.projected_sq.unsqueeze(0), q, index.projected.t(), alpha=-2.0)
    # A first delta per patch from its 2k best-bounded centres, measured exactly.
    first = torch.topk(bounds, min(2 * k, bounds.shape[1]), dim=1, largest=False).indices
    delta_hat = exact_sq_distances(p, index.centres, first, budget_bytes).kthvalue(k, dim=1).values
    tau = projected_threshold(
        delta_hat, x.square().sum(dim=1).sqrt(), q_sq, index, p.shape[1], u_mm
    )
    limit32 = (tau - q_sq.double()).float()  # rounded up below, so no centre is dropped by it
    limit32 = torch.nextafter(limit32, torch.full_like(limit32, math.inf))
    keep = (bounds <= limit32.unsqueeze(1)).any(dim=0)  # (M,)
    keep[first.flatten()] = True  # the first candidates always stay (delta is theirs)
    cols = keep.nonzero().flatten()
    if cols.numel() > max_fraction * bounds.shape[1]:
        return None
    return _dense_block(p, index, k, budget_bytes, u_mm, cols)


def block_rows(n_centres: int, dim: int, budget_bytes: int) -> int:
    """Patches per block: their (n, M) approximate values and small temporaries fit the budget."""
    return max(1, budget_bytes // (4 * (max(n_centres, 1) + 2 * dim)))


@torch.no_grad()
def nearest(
    p: Tensor,
    index: SearchIndex,
    k: int,
    budget_bytes: int | None,
    block: int = PRUNED_BLOCK,
    max_fraction: float = 0.5,
) -> SearchResult:
    """The k nearest centres of every patch, exact: values ascending (N, k) and indices (N, k).

    Pruned when `index.basis` is set, dense otherwise. Pruned blocks of `block` patches keep the
    centres that some patch's bound cannot rule out; a block left with over `max_fraction` of the
    centres goes dense. `budget_bytes=None`: one loop-free block for export: the expanded form
    ranks, the k winners are recomputed as direct differences, without a certificate.
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
        pruning = index.basis is not None
        step = block_rows(m, p.shape[1], budget_bytes)
        if pruning:
            step = min(step, block)
        values = torch.empty(n, k, dtype=torch.float32, device=p.device)
        indices = torch.empty(n, k, dtype=torch.int64, device=p.device)
        checked, dense_rows = 0, 0
        buffer = None if pruning else torch.empty(min(step, n), m, device=p.device)
        for s in range(0, n, step):
            rows = p[s : s + step]
            found = None
            if pruning:
                found = _pruned_block(rows, index, k, max_fraction, budget_bytes, u_mm)
            if found is None:
                out = None if buffer is None else buffer[: rows.shape[0]]
                found = _dense_block(rows, index, k, budget_bytes, u_mm, out=out)
                dense_rows += rows.shape[0]
            values[s : s + step], indices[s : s + step], c = found
            checked += c
    return SearchResult(values, indices, SearchStats(n, m, checked, dense_rows))
