"""The dense search and the selected distances (models/distances.py) against float64 brute force.

Brute force in float64 is the oracle: results are compared by distance, so that centres whose
distances tie (to float32 rounding) may come in either order.
"""

import pytest
import torch

from cfa_lightning.models import distances
from cfa_lightning.models.distances import (
    block_budget,
    block_rows,
    build_index,
    nearest,
    selected_squared_distances,
    squared_distances,
)

BUDGET = 32 * 2**20


def _brute(p, c, k):
    d = torch.cdist(p.double(), c.double()).pow(2)  # float64 reference
    return torch.topk(d, k, dim=1, largest=False, sorted=True)


def trained_like(n=300, m=512, dim=64, rank=8, seed=0, scale=1.0):
    """Centres on a low-rank structure far from the origin (||c||^2 in the thousands), and
    patches close to one centre each, as after training."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(m, rank, generator=g) @ torch.randn(rank, dim, generator=g) * 2 + 5
    c += 0.3 * torch.randn(m, dim, generator=g)
    p = c[torch.randint(m, (n,), generator=g)] + 0.2 * torch.randn(n, dim, generator=g)
    return p * scale, c * scale


def assert_exact(values, indices, p, c, k, rtol=1e-5):
    ref_v, _ = _brute(p, c, k)
    assert values.dtype == torch.float32
    assert torch.allclose(values.double(), ref_v, rtol=rtol, atol=1e-5)
    # the returned centres are at the brute-force distances (ties may swap indices)
    d_mine = torch.cdist(p.double(), c.double()).pow(2).gather(1, indices)
    assert torch.allclose(d_mine, ref_v, rtol=rtol, atol=1e-5)


@pytest.mark.parametrize("budget", [1, 4 * 300 * 7, BUDGET, None])  # one row, ragged, one block
def test_search_equals_brute_force_on_random_and_trained_like(budget):
    torch.manual_seed(0)
    for p, c in [(torch.randn(97, 64), torch.randn(300, 64)), trained_like(n=97, m=300)]:
        values, indices = nearest(p, build_index(c), 6, budget)
        assert_exact(values, indices, p, c, 6)


def test_tied_distances():
    # Centres on a grid: many patches sit at exactly equal distances from several centres.
    grid = torch.stack(torch.meshgrid(torch.arange(6.0), torch.arange(6.0), indexing="ij"), -1)
    c = torch.cat([grid.reshape(-1, 2), torch.zeros(36, 6)], dim=1) + 10  # (36, 8)
    p = c[::3] + torch.tensor([0.5, 0.5] + [0.0] * 6)  # equidistant from 4 centres
    values, indices = nearest(p, build_index(c), 4, BUDGET)
    assert_exact(values, indices, p, c, 4)


def test_too_few_centres_is_a_clear_error():
    with pytest.raises(ValueError, match="gamma_c"):
        nearest(torch.zeros(2, 3), build_index(torch.randn(2, 3)), 3, BUDGET)


def _bf16_addmm(real_addmm):
    def addmm(bias, a, b, alpha=1.0, **kw):  # inputs rounded to bf16, float32 accumulation
        return real_addmm(bias, a.bfloat16().float(), b.bfloat16().float(), alpha=alpha, **kw)

    return addmm


def test_reduced_precision_ranking_gives_the_fp32_answer(monkeypatch):
    """What set_float32_matmul_precision("medium") does on a GPU (bf16 passes in the product),
    emulated on the CPU, where that setting changes nothing: the ranking product's inputs are
    rounded to bf16. The margin and the direct-difference recompute still give brute force's
    answer, while the bf16 ranking alone picks wrong neighbours on the same features."""
    p, c = trained_like(n=400, m=600, dim=96, seed=3, scale=6.0)  # nearest d in the tens
    ref = nearest(p, build_index(c), 3, BUDGET)
    monkeypatch.setattr(distances.torch, "addmm", _bf16_addmm(torch.addmm))
    values, indices = nearest(p, build_index(c), 3, BUDGET)
    assert_exact(values, indices, p, c, 3)
    assert torch.equal(values, ref[0])  # bit-identical: the values never come from the product
    monkeypatch.setattr(distances, "MARGIN", 0)  # the ranking alone: wrong neighbours
    _, naive = nearest(p, build_index(c), 3, BUDGET)
    ref_v, _ = _brute(p, c, 3)
    d_naive = torch.cdist(p.double(), c.double()).pow(2).gather(1, naive).sort(1).values
    assert not torch.allclose(d_naive, ref_v, rtol=1e-5)


def test_blocks_follow_the_budget_and_auto_fits_a_wide_resnet_batch_on_an_80gb_card(monkeypatch):
    assert block_budget("auto", torch.device("cpu")) == 32 * 2**20
    assert block_budget(12345, torch.device("cpu")) == 12345
    assert block_budget(None, torch.device("cpu")) is None
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    budget = block_budget("auto", torch.device("cuda"))  # 60 GiB free of 80, e.g. in training
    # wide_resnet50_2 at 256 px: M = 64 * 64 centres, D' = 1792; a batch of 32 = 131072 patches
    for k in (3, 6):  # scoring and the loss
        assert block_rows(64 * 64, 1792, k, budget) >= 32 * 64 * 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selected_distances_value_and_gradient_match_full(dtype):
    torch.manual_seed(1)
    p = torch.randn(17, 6).to(dtype).requires_grad_()
    c = torch.randn(9, 6)
    idx = torch.topk(torch.cdist(p.detach().float(), c), 4, dim=1, largest=False).indices
    weights = torch.randn(17, 4)
    fast = selected_squared_distances(p, c, idx)
    assert fast.dtype == torch.float32
    (fast * weights).sum().backward()
    g_fast = p.grad.clone()
    p.grad = None
    ref = squared_distances(p, c).gather(1, idx)
    (ref * weights).sum().backward()
    assert torch.allclose(fast, ref, atol=1e-5)
    assert g_fast.dtype == dtype
    assert torch.allclose(
        g_fast.float(), p.grad.float(), atol=1e-5 if dtype == torch.float32 else 0.1
    )


def test_distances_stay_float32_under_bf16_autocast():
    torch.manual_seed(2)
    p, c = torch.randn(40, 16), torch.randn(12, 16)
    index = build_index(c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v, i = nearest(p.bfloat16(), index, 3, BUDGET)
        d = selected_squared_distances(p.bfloat16().requires_grad_(), c, i)
    assert v.dtype == torch.float32 and d.dtype == torch.float32
    # only the bf16 rounding of the inputs differs, not a bf16 accumulation
    assert_exact(v, i, p.bfloat16().float(), c, 3)
    exact = torch.cdist(p.bfloat16().double(), c.double()).pow(2).gather(1, i)
    assert torch.allclose(d.double(), exact, rtol=1e-5, atol=1e-5)
