import math

import pytest
import torch

from cfa_lightning.models.memory_bank import MemoryBank
from cfa_lightning.models.scoring import (
    DEFAULT_CHUNK_BYTES,
    GaussianBlur,
    anomaly_map,
    gaussian_sigma_kernel,
    patch_scores,
    selected_squared_distances,
    squared_distances,
)
from cfa_lightning.models.search import nearest


def test_patch_score_by_hand():
    d = torch.tensor([[1.0, 4.0, 9.0]])  # e = 1, 2, 3
    w = math.exp(-1) / (math.exp(-1) + math.exp(-2) + math.exp(-3))
    assert patch_scores(d).item() == pytest.approx(w * 1.0, rel=1e-6)


def test_clamp_before_sqrt_gives_no_nan():
    d = torch.tensor([[-1e-6, 0.0, 0.0]])
    s = patch_scores(d)
    assert torch.isfinite(s).all() and s.item() == 0.0


def _nearest(p, c, k):
    """The project's exact search over a bank holding exactly these centres."""
    bank = MemoryBank(c.shape[1], 1, c.shape[0])
    bank.centres.copy_(c)
    bank.fit_search()
    bank.fitted.fill_(True)
    result = nearest(p, bank.search_index(pruned=False), k, DEFAULT_CHUNK_BYTES)
    return result.values, result.indices


def test_identical_features_give_no_nan():
    p = torch.full((5, 8), 3.1234567)
    c = torch.full((6, 8), 3.1234567)
    values, _ = _nearest(p, c, 3)
    assert torch.isfinite(patch_scores(values)).all()


@pytest.mark.parametrize("budget", [1, 500, 10**9])
def test_selected_distances_value_and_gradient_match_full(budget):
    torch.manual_seed(1)
    p = torch.randn(17, 6, requires_grad=True)
    c = torch.randn(9, 6)
    idx = torch.topk(torch.cdist(p.detach(), c), 4, dim=1, largest=False).indices
    weights = torch.randn(17, 4)
    fast = selected_squared_distances(p, c, idx, budget_bytes=budget)
    (fast * weights).sum().backward()
    g_fast = p.grad.clone()
    p.grad = None
    ref = squared_distances(p, c).gather(1, idx)
    (ref * weights).sum().backward()
    assert torch.allclose(fast, ref, atol=1e-5)
    assert torch.allclose(g_fast, p.grad, atol=1e-5)


def test_anomaly_map_upsamples_blurs_and_keeps_peak():
    assert gaussian_sigma_kernel(4.0) == 33
    scores = torch.zeros(1, 8, 12)
    scores[0, 2, 9] = 1.0
    maps = anomaly_map(scores, (64, 96), GaussianBlur(4.0))
    assert maps.shape == (1, 64, 96)
    peak = divmod(int(maps[0].argmax()), 96)
    assert abs(peak[0] - (2 + 0.5) * 8) <= 2 and abs(peak[1] - (9 + 0.5) * 8) <= 2
    const = anomaly_map(torch.full((2, 4, 4), 0.7), (32, 32), GaussianBlur(4.0))
    assert torch.allclose(const, torch.full_like(const, 0.7), atol=1e-6)  # reflect padding


def test_blur_matches_torchvision_gaussian_blur():
    from torchvision.transforms.v2 import functional as TF

    torch.manual_seed(3)
    maps = torch.rand(2, 1, 40, 56)
    expected = TF.gaussian_blur(maps, kernel_size=[33, 33], sigma=[4.0, 4.0])  # reflect padding
    assert torch.allclose(GaussianBlur(4.0)(maps), expected, atol=1e-6)
    assert torch.equal(GaussianBlur(0.0)(maps), maps)


def test_distances_stay_float32_under_bf16_autocast():
    torch.manual_seed(2)
    p, c = torch.randn(40, 16), torch.randn(12, 16)
    ref_v, ref_i = _nearest(p, c, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v, i = _nearest(p.bfloat16(), c, 3)
        d = selected_squared_distances(p.bfloat16().requires_grad_(), c, ref_i)
    assert v.dtype == torch.float32 and d.dtype == torch.float32
    # only the bf16 rounding of the inputs differs, not a bf16 accumulation of the product
    exact = torch.cdist(p.bfloat16().float(), c).pow(2).gather(1, ref_i)
    assert torch.allclose(d, exact, rtol=1e-5, atol=1e-5)
    assert torch.equal(i, ref_i) or torch.allclose(v, ref_v, rtol=2e-2)
