import pytest
import torch

from cfa_lightning.models.memory_bank import MemoryBank, kmeans


def test_mean_is_exact_for_uneven_batches():
    torch.manual_seed(0)
    feats = torch.randn(7, 5, 3, 4) * 100 + 3
    bank = MemoryBank(dim=5, height=3, width=4)
    for chunk in (feats[:3], feats[3:6], feats[6:]):  # batches of 3, 3 and a last partial 1
        bank.update(chunk)
    bank.finalize()
    expected = feats.double().mean(dim=0).flatten(1).t().float()  # (h*w, D')
    assert torch.allclose(bank.centres, expected, atol=1e-5)
    assert bool(bank.fitted)
    # a mean of per-batch means would weight the last image 3x: make sure that is not what we did
    wrong = torch.stack([c.mean(0) for c in (feats[:3], feats[3:6], feats[6:])]).mean(0)
    assert not torch.allclose(bank.centres, wrong.flatten(1).t(), atol=1e-3)


def test_kmeans_gives_exact_count_and_is_seeded():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(20, 4) + 10 * i for i in range(3)])
    c1 = kmeans(x, 3, seed=1)
    c2 = kmeans(x, 3, seed=1)
    assert c1.shape == (3, 4)
    assert torch.equal(c1, c2)
    # three well separated blobs: every blob mean is found
    means = torch.stack([x[i * 20 : (i + 1) * 20].mean(0) for i in range(3)])
    assert torch.cdist(means, c1).min(dim=1).values.max() < 1e-4


def test_kmeans_with_duplicates_keeps_count():
    x = torch.zeros(10, 3)
    x[5:] = 1.0
    c = kmeans(x, 4, seed=0)
    assert c.shape == (4, 3)
    assert torch.isfinite(c).all()


def test_bank_gamma_c_compresses_and_is_a_buffer():
    bank = MemoryBank(dim=2, height=4, width=4, gamma_c=4)
    assert bank.n_centres == 4
    bank.update(torch.randn(2, 2, 4, 4))
    bank.finalize()
    state = bank.state_dict()
    assert set(state) == {"centres", "fitted"}  # the running sums are no buffers
    assert {name for name, _ in bank.named_buffers()} == {"centres", "fitted"}
    restored = MemoryBank(dim=2, height=4, width=4, gamma_c=4)
    restored.load_state_dict(state)
    assert torch.equal(restored.centres, bank.centres) and bool(restored.fitted)


def test_empty_bank_and_bad_shapes_fail_clearly():
    bank = MemoryBank(dim=2, height=2, width=2)
    with pytest.raises(RuntimeError, match="no training image"):
        bank.finalize()
    with pytest.raises(ValueError, match="image size"):
        bank.update(torch.zeros(1, 2, 3, 3))
    with pytest.raises(ValueError, match="gamma_c"):
        MemoryBank(dim=2, height=2, width=2, gamma_c=5)


def test_checkpoint_with_the_pruned_search_buffers_loads():
    """Banks saved before the lean search carry centre_mean, basis, basis_norm, search_dims,
    group_of (and, from older code, _sum/_count): they are dropped on load, strictly."""
    bank = MemoryBank(dim=4, height=2, width=3)
    bank.update(torch.randn(2, 4, 2, 3))
    bank.finalize()
    old = dict(bank.state_dict())
    old.update(centre_mean=torch.zeros(4), basis=torch.eye(4), search_dims=torch.tensor(4),
               basis_norm=torch.tensor(1.0, dtype=torch.float64),
               group_of=torch.zeros(6, dtype=torch.int64),
               _sum=torch.zeros(4, 2, 3, dtype=torch.float64), _count=torch.tensor(2.0))  # fmt: skip
    restored = MemoryBank(dim=4, height=2, width=3)
    restored.load_state_dict(old)  # strict=True
    assert torch.equal(restored.centres, bank.centres) and bool(restored.fitted)
