"""Squared distances d(p, c) = ||p - c||^2 from patches to the memory bank
(docs/method.md, section 3).

`nearest` finds each patch's k nearest centres in one dense pass per block of patches:
1. rank: the expanded form ||x||^2 + ||y||^2 - 2 x.y on vectors centred on the bank mean
   (x = p - mu, y = c - mu, so the cancellation is that of distances, not of ||c||^2 in the
   thousands), one float32 matrix product per block; ||x||^2 is the same for every centre of a
   row, so it is left out: the ranking is ||y||^2 - 2 x.y;
2. keep the k + MARGIN best of that ranking;
3. recompute their distances as direct differences ||p - c||^2, whose float32 error is
   relative to d itself, and keep the k smallest. This runs on sub-blocks of DIRECT_ROWS rows,
   one candidate column at a time, so its temporaries stay in cache, and the norm kernel reads
   each difference once (measured in experiments/results/speed.md).
The answer does not depend on how torch's matmul is configured (TF32, bf16 passes): reduced
precision can only reorder near-ties inside the margin, and the returned distances never come
from the matrix product. Training, validation, test, predict and exported graphs all run this.

Blocks have a fixed number of rows computed from shapes and the memory budget only: no host
sync and no data-dependent branch per block (`torch.compile(fullgraph=True)` traces it).
`selected_squared_distances` recomputes the chosen distances with gradients for the loss.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

DEFAULT_CHUNK_BYTES = 32 * 2**20  # CPU block budget (model.chunk_mb: auto)
CUDA_FREE_SHARE = 0.5  # CUDA block budget (auto): this share of the memory torch can still use
MARGIN = 4  # extra candidates re-ranked by direct differences (tests/test_distances.py, margin)
DIRECT_ROWS = 256  # rows per sub-block of the direct differences (blocked searches only)


class Exclusion(NamedTuple):
    """Pairs the search leaves out (training on a bank of own copies, memory_bank.py): patch n
    never finds centre m when ``patches[n] == centres[m]``."""

    patches: Tensor  # (N,) int64: the image of each patch
    centres: Tensor  # (M,) int64: the image each centre copies, -1 for none


class SearchIndex(NamedTuple):
    """The bank prepared once for `nearest` (cached by `MemoryBank.search_index`)."""

    centres: Tensor  # (M, D') float32 c, for the direct differences
    mean: Tensor  # (D',) mu, the bank mean: patches and centres are centred on it
    centred: Tensor  # (M, D') y = c - mu
    centred_sq: Tensor  # (M,) ||y||^2
    size: int  # M, a Python int: traced graphs branch on no tensor shape


def build_index(centres: Tensor) -> SearchIndex:
    """(M, D') centres -> their mean, centred copies and squared norms (float64, then float32)."""
    c64 = centres.detach().double()
    mean = c64.mean(dim=0)  # (D',)
    centred = (c64 - mean).float()  # (M, D')
    return SearchIndex(
        centres.detach().float(),
        mean.float(),
        centred,
        centred.square().sum(1),
        int(centres.shape[0]),
    )


def float32_region(x: Tensor) -> torch.autocast:
    """Autocast off: distances are computed in float32 even under bf16/fp16 mixed precision."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def chunk_budget_bytes(chunk_mb: float | str) -> int | str:
    """model.chunk_mb -> CFA's chunk_bytes: "auto" stays, a number of MB becomes bytes."""
    if chunk_mb == "auto":
        return "auto"
    if isinstance(chunk_mb, bool) or not isinstance(chunk_mb, int | float) or chunk_mb <= 0:
        raise ValueError(f"model.chunk_mb={chunk_mb!r}; give a positive number of MB or auto")
    return int(chunk_mb * 2**20)


def block_budget(chunk_bytes: int | str | None, device: torch.device) -> int | None:
    """Bytes one block may use: explicit, None (one block), or "auto" from the device."""
    if chunk_bytes != "auto":
        return chunk_bytes
    if device.type == "cuda":  # free memory plus what torch's caching allocator holds unused
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(CUDA_FREE_SHARE * (free + cached))
    return DEFAULT_CHUNK_BYTES


def candidates(k: int, n_centres: int) -> int:
    """c = k + MARGIN centres re-ranked exactly (at most M)."""
    return min(k + MARGIN, n_centres)


def row_bytes(n_centres: int, dim: int, k: int) -> int:
    """Memory of one patch row of a search block: its (M,) ranking, x, the (D',) gathered
    candidate and its difference (one column at a time, `direct_sq_distances`), indices and
    values. An upper bound: the gathered rows are those of a DIRECT_ROWS sub-block only."""
    c = candidates(k, n_centres)
    return 4 * (n_centres + 3 * dim) + 16 * c


def block_rows(n_centres: int, dim: int, k: int, budget_bytes: int) -> int:
    """Patch rows per block within the budget (>= 1; `CFA` refuses budgets below one row)."""
    return max(1, budget_bytes // row_bytes(n_centres, dim, k))


def smallest_chunk_mb(n_centres: int, dim: int, k: int) -> float:
    """The smallest model.chunk_mb that holds one row, rounded up to 1/1000 MB."""
    return math.ceil(row_bytes(n_centres, dim, k) / 2**20 * 1000) / 1000


def direct_sq_distances(p: Tensor, centres: Tensor, idx: Tensor) -> Tensor:
    """||p_n - c_idx[n, j]||^2 as direct differences: (n, D'), (n, c) -> (n, c) float32.

    One column of candidates at a time ((n, D') temporaries instead of (n, c, D')); the
    difference is made in place in the gathered copy and reduced by one norm kernel.
    """
    columns, idx_t = [], idx.t().contiguous()  # (c, n): each column contiguous
    for j in range(idx_t.shape[0]):
        diff = centres.index_select(0, idx_t[j]).sub_(p)  # (n, D') c - p
        columns.append(torch.linalg.vector_norm(diff, dim=1))
    return torch.stack(columns, dim=1).square()


def _nearest_block(
    p: Tensor, index: SearchIndex, k: int, sub_rows: int | None, exclude: Exclusion | None = None
) -> tuple[Tensor, Tensor]:
    """Rank by the centred expanded form, re-rank the best k + MARGIN by direct differences
    (in sub-blocks of sub_rows rows; None: all rows at once, for exported graphs)."""
    x = p - index.mean  # (n, D')
    ranking = torch.addmm(index.centred_sq.unsqueeze(0), x, index.centred.t(), alpha=-2.0)  # (n, M)
    if exclude is not None:  # a patch never ranks its own image's copies
        ranking.masked_fill_(exclude.patches.unsqueeze(1) == exclude.centres, float("inf"))
    c = candidates(k, index.size)
    cand = torch.topk(ranking, c, dim=1, largest=False, sorted=False).indices  # (n, c)
    n = p.shape[0]
    if sub_rows is None or sub_rows >= n:
        d = direct_sq_distances(p, index.centres, cand)  # (n, c)
    else:
        blocks = [
            direct_sq_distances(p[s : s + sub_rows], index.centres, cand[s : s + sub_rows])
            for s in range(0, n, sub_rows)
        ]
        d = torch.cat(blocks)  # (n, c)
    if exclude is not None:  # nor keeps one that a short list of others let in
        d.masked_fill_(exclude.centres[cand] == exclude.patches.unsqueeze(1), float("inf"))
    values, j = torch.topk(d, k, dim=1, largest=False, sorted=True)
    return values, cand.gather(1, j)


@torch.no_grad()
def nearest(
    p: Tensor,
    index: SearchIndex,
    k: int,
    budget_bytes: int | None,
    exclude: Exclusion | None = None,
) -> tuple[Tensor, Tensor]:
    """The k nearest centres of (N, D') patches: squared distances (float32, direct differences,
    ascending) and centre indices, both (N, k). budget_bytes=None: one block (exported graphs,
    whose batch size stays dynamic). ``exclude``: pairs left out (training only)."""
    n_centres, dim = index.size, index.centres.shape[1]
    if k > n_centres:
        raise ValueError(
            f"need {k} nearest centres but the memory bank holds only {n_centres}; "
            "lower model.gamma_c or model.K / model.J"
        )
    with float32_region(p):
        p = p.float()
        n = p.shape[0]
        step = n if budget_bytes is None else block_rows(n_centres, dim, k, budget_bytes)
        sub = None if budget_bytes is None else DIRECT_ROWS
        if budget_bytes is None or step >= n:
            return _nearest_block(p, index, k, sub, exclude)
        blocks = [
            _nearest_block(p[s : s + step], index, k, sub, _rows(exclude, s, step))
            for s in range(0, n, step)
        ]
        return torch.cat([v for v, _ in blocks]), torch.cat([i for _, i in blocks])


def _rows(exclude: Exclusion | None, start: int, step: int) -> Exclusion | None:
    """The exclusion of one block of patch rows."""
    if exclude is None:
        return None
    return Exclusion(exclude.patches[start : start + step], exclude.centres)


def squared_distances(p: Tensor, centres: Tensor) -> Tensor:
    """Every d = ||p||^2 + ||c||^2 - 2 p.c in float32, with autograd: (N, D'), (M, D') -> (N, M).

    The naive reference (`CFA.loss(naive=True)`); may dip slightly below 0.
    """
    with float32_region(p):
        p, centres = p.float(), centres.float()
        d = torch.addmm(centres.square().sum(dim=1).unsqueeze(0), p, centres.t(), alpha=-2.0)
        return d + p.square().sum(dim=1, keepdim=True)


class _SelectedSquaredDistance(torch.autograd.Function):
    """||p_n - c_{idx[n, j]}||^2 for the selected centres only; saves indices, not (N, k, D').

    Vectorised over all N rows, one selected column at a time ((N, D') temporaries).
    """

    @staticmethod
    def forward(ctx, p: Tensor, centres: Tensor, idx: Tensor) -> Tensor:
        with float32_region(p):
            out = direct_sq_distances(p.float(), centres.float(), idx)  # (N, k)
        ctx.save_for_backward(p, centres, idx)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        p, centres, idx = ctx.saved_tensors
        with float32_region(p):
            g = grad_out.float()  # (N, k)
            p32, c32 = p.float(), centres.float()
            # d/dp sum_j g_j ||p - c_j||^2 = 2 (p sum_j g_j - sum_j g_j c_j)
            pulled = torch.zeros_like(p32)
            for j in range(idx.shape[1]):
                pulled.addcmul_(g[:, j : j + 1], c32.index_select(0, idx[:, j]))
            grad_p = 2.0 * (p32 * g.sum(dim=1, keepdim=True) - pulled)
        return grad_p.to(p.dtype), None, None


def selected_squared_distances(p: Tensor, centres: Tensor, idx: Tensor) -> Tensor:
    """Differentiable (w.r.t. p) squared distances to the centres in idx: (N, D'), (N, k) -> (N, k)."""
    return _SelectedSquaredDistance.apply(p, centres.detach(), idx)
