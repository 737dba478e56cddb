import pytest
import torch

from cfa_lightning.models.memory_bank import NO_OWNER, MemoryBank, greedy_coreset, kmeans
from tiny_models import bank_settings


def test_mean_is_exact_for_uneven_batches():
    torch.manual_seed(0)
    feats = torch.randn(7, 5, 3, 4) * 100 + 3
    bank = MemoryBank(dim=5, height=3, width=4, **bank_settings())
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
    c1, labels = kmeans(x, 3, seed=1)
    c2, _ = kmeans(x, 3, seed=1)
    assert labels.shape == (60,) and len(set(labels.tolist())) == 3
    assert c1.shape == (3, 4)
    assert torch.equal(c1, c2)
    # three well separated blobs: every blob mean is found
    means = torch.stack([x[i * 20 : (i + 1) * 20].mean(0) for i in range(3)])
    assert torch.cdist(means, c1).min(dim=1).values.max() < 1e-4


def test_kmeans_with_duplicates_keeps_count():
    x = torch.zeros(10, 3)
    x[5:] = 1.0
    c, _ = kmeans(x, 4, seed=0)
    assert c.shape == (4, 3)
    assert torch.isfinite(c).all()


def test_bank_gamma_c_compresses_and_is_a_buffer():
    bank = MemoryBank(dim=2, height=4, width=4, **bank_settings(gamma_c=4))
    assert bank.n_centres == 4
    bank.update(torch.randn(2, 2, 4, 4))
    bank.finalize()
    state = bank.state_dict()
    assert set(state) == {"centres", "fitted", "owners"}  # the running sums are no buffers
    assert {name for name, _ in bank.named_buffers()} == {"centres", "fitted", "owners"}
    assert (bank.owners == NO_OWNER).all()  # a positional mean copies no one image
    restored = MemoryBank(dim=2, height=4, width=4, **bank_settings(gamma_c=4))
    restored.load_state_dict(state)
    assert torch.equal(restored.centres, bank.centres) and bool(restored.fitted)


def test_empty_bank_and_bad_shapes_fail_clearly():
    bank = MemoryBank(dim=2, height=2, width=2, **bank_settings())
    with pytest.raises(RuntimeError, match="no training image"):
        bank.finalize()
    with pytest.raises(ValueError, match="image size"):
        bank.update(torch.zeros(1, 2, 3, 3))
    with pytest.raises(ValueError, match="gamma_c"):
        MemoryBank(dim=2, height=2, width=2, **bank_settings(gamma_c=5))


def test_checkpoint_with_the_pruned_search_buffers_loads():
    """Older banks carry the retired search's centre_mean, basis, basis_norm, search_dims,
    group_of (and some _sum/_count): they are dropped on load, strictly."""
    bank = MemoryBank(dim=4, height=2, width=3, **bank_settings())
    bank.update(torch.randn(2, 4, 2, 3))
    bank.finalize()
    old = dict(bank.state_dict())
    old.update(centre_mean=torch.zeros(4), basis=torch.eye(4), search_dims=torch.tensor(4),
               basis_norm=torch.tensor(1.0, dtype=torch.float64),
               group_of=torch.zeros(6, dtype=torch.int64),
               _sum=torch.zeros(4, 2, 3, dtype=torch.float64), _count=torch.tensor(2.0))  # fmt: skip
    restored = MemoryBank(dim=4, height=2, width=3, **bank_settings())
    restored.load_state_dict(old)  # strict=True
    assert torch.equal(restored.centres, bank.centres) and bool(restored.fitted)


def _pooled(construction, size, n_images=6, max_patches=2**17, seed=0):
    torch.manual_seed(seed)
    feats = torch.randn(n_images, 3, 4, 5)  # (B, D', h, w)
    settings = bank_settings(construction, size=size, seed=seed, max_patches=max_patches)
    bank = MemoryBank(3, 4, 5, **settings)
    bank.reset(n_images)
    bank.update(feats[:4])
    bank.update(feats[4:])
    bank.finalize()
    return bank, feats.permute(0, 2, 3, 1).reshape(-1, 3)  # all patches (N, D')


def test_coreset_centres_are_real_patches_and_cover_them():
    bank, patches = _pooled("coreset", 40)
    assert bank.n_centres == 40 and bool(bank.fitted)
    assert (bank.centres[:, None] == patches[None]).all(dim=2).any(dim=1).all()  # real patches
    assert len({tuple(c.tolist()) for c in bank.centres}) == 40  # no patch twice
    # greedy k-center covers the patches better than the same number drawn at random
    radius = torch.cdist(patches, bank.centres).min(dim=1).values.max()
    drawn = patches[torch.randperm(len(patches), generator=torch.Generator().manual_seed(0))[:40]]
    assert radius < torch.cdist(patches, drawn).min(dim=1).values.max()


def test_greedy_coreset_takes_the_farthest_point_each_step():
    x = torch.tensor([[0.0], [1.0], [10.0], [4.0], [6.0]])
    chosen = greedy_coreset(x, 3, seed=0, projection_dim=None).tolist()
    first = chosen[0]
    far = {0: 2, 1: 2, 2: 0, 3: 2, 4: 0}[first]  # the point farthest from the first
    assert chosen[1] == far
    assert len(set(chosen)) == 3


def test_kmeans_bank_is_seeded_and_sized_by_a_fraction():
    bank, patches = _pooled("kmeans", 0.25)
    assert bank.n_centres == round(0.25 * len(patches))  # 30 of 120 patches
    again, _ = _pooled("kmeans", 0.25)
    assert torch.equal(bank.centres, again.centres)
    # every centre lies inside the cloud of patches it was fitted to
    assert torch.cdist(bank.centres, patches).min(dim=1).values.max() < 3.0


def test_default_size_is_h_times_w_and_the_pool_keeps_a_share_of_each_image():
    bank, _ = _pooled("coreset", None)
    assert bank.n_centres == 4 * 5
    small = MemoryBank(3, 4, 5, **bank_settings("coreset", max_patches=30))
    assert small.patches_per_image(6) == 5 and small.pool_size(6) == 30
    small.reset(6)
    small.update(torch.randn(6, 3, 4, 5))
    pool, count = small.statistics()
    assert pool.shape == (30, 3) and int(count) == 6


def test_a_fraction_bank_restores_its_own_row_count():
    bank, _ = _pooled("coreset", 0.5)
    fresh = MemoryBank(3, 4, 5, **bank_settings("coreset", size=0.5))
    assert fresh.n_centres == 20  # a placeholder until the data is seen
    fresh.load_state_dict(bank.state_dict())
    assert fresh.n_centres == 60 and torch.equal(fresh.centres, bank.centres)


def test_a_size_given_to_the_positional_bank_is_ignored_with_a_warning(caplog):
    bank = MemoryBank(3, 4, 5, **bank_settings("positional", size=100))
    assert bank.n_centres == 20
    assert "model.bank.size=100 is ignored by model/bank=positional" in caplog.text


def test_bad_bank_options_name_the_option_and_the_largest_valid_value():
    with pytest.raises(ValueError, match=r"model/bank='nearest'.*positional, kmeans, coreset"):
        MemoryBank(3, 4, 5, **bank_settings(construction="nearest"))
    for bad in (0.0, 1.5, -2):
        with pytest.raises(ValueError, match="model.bank.size"):
            MemoryBank(3, 4, 5, **bank_settings("coreset", size=bad))
    with pytest.raises(ValueError, match="gamma_c.*model.bank.size"):
        MemoryBank(3, 4, 5, **bank_settings("kmeans", gamma_c=2))
    bank = MemoryBank(3, 4, 5, **bank_settings("coreset", size=0.9, max_patches=100))
    with pytest.raises(ValueError, match=r"model.bank.size=0.9.*largest valid size is 96"):
        bank.centres_for(6)  # 6 images x 20 patches = 120; the pool keeps 100 // 6 = 16 of each
    # a count is the most centres: a smaller pool gives every patch it keeps
    assert (
        MemoryBank(3, 4, 5, **bank_settings("coreset", size=500, max_patches=100)).centres_for(6)
        == 96
    )


def _owned_batches(n_images: int, dim: int = 3, side: int = 2):
    torch.manual_seed(0)
    feats = torch.randn(n_images, dim, side, side)
    return feats, torch.arange(100, 100 + n_images)  # image ids


def test_coreset_centres_know_their_image():
    feats, ids = _owned_batches(5)
    bank = MemoryBank(dim=3, height=2, width=2, **bank_settings("coreset", size=8))
    bank.update(feats[:3], ids[:3])
    bank.update(feats[3:], ids[3:])
    bank.finalize()
    patches = feats.flatten(2).transpose(1, 2)  # (5, 4, 3)
    for centre, owner in zip(bank.centres, bank.owners, strict=True):
        image = int(owner) - 100
        assert 0 <= image < 5
        assert (patches[image] - centre).abs().sum(dim=1).min() == 0  # a patch of that image


def test_kmeans_cluster_of_one_image_is_owned_and_mixed_ones_are_not():
    # image 0's patches sit far apart from everything; images 1-3 share one blob
    feats = torch.zeros(4, 2, 1, 2)
    feats[0, :, 0, 0], feats[0, :, 0, 1] = 100.0, 100.5
    feats[1:] = torch.randn(3, 2, 1, 2) * 0.01
    bank = MemoryBank(dim=2, height=1, width=2, **bank_settings("kmeans", size=2))
    bank.update(feats, torch.tensor([7, 8, 9, 10]))
    bank.finalize()
    far = bank.centres.norm(dim=1).argmax()
    assert int(bank.owners[far]) == 7
    assert int(bank.owners[1 - far]) == NO_OWNER
    assert bank.most_owned() == 1


def test_checkpoint_without_owners_loads_with_none_owned():
    bank = MemoryBank(dim=2, height=2, width=2, **bank_settings("coreset", size=3))
    bank.update(torch.randn(2, 2, 2, 2), torch.tensor([1, 2]))
    bank.finalize()
    state = {k: v for k, v in bank.state_dict().items() if k != "owners"}  # an older checkpoint
    restored = MemoryBank(dim=2, height=2, width=2, **bank_settings("coreset", size=3))
    restored.load_state_dict(state)
    assert torch.equal(restored.centres, bank.centres)
    assert (restored.owners == NO_OWNER).all() and restored.most_owned() == 0


def test_the_coreset_picks_each_point_once():
    """Issue 38: 30 centres of 20 distinct points gave copies, and projection_dim=0 was
    accepted (50 picks, 2 distinct indices)."""
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(0)).repeat(3, 1)  # 60, 20 apart
    chosen = greedy_coreset(x, 20, seed=0, projection_dim=None)
    assert len({tuple(row) for row in x[chosen].tolist()}) == 20
    with pytest.raises(ValueError, match=r"1 <= n <= 20 distinct points \(of 60"):
        greedy_coreset(x, 30, seed=0)
    with pytest.raises(ValueError, match="projection needs >= 1 dimension"):
        greedy_coreset(x, 5, seed=0, projection_dim=0)
    distinct = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    assert len(set(greedy_coreset(distinct, 50, seed=0, projection_dim=1).tolist())) == 50


@pytest.mark.parametrize(("size", "m"), [(0.5, 8), (1.0, 16)])  # 1.0: the whole pool, no selection
def test_a_coreset_beyond_the_distinct_patches_is_refused_naming_the_size(size, m):
    same = torch.randn(1, 3, 2, 2).expand(4, -1, -1, -1)  # 4 identical images: 4 distinct patches
    bank = MemoryBank(3, 2, 2, **bank_settings("coreset", size=size))
    bank.update(same, torch.arange(4))
    with pytest.raises(ValueError, match=rf"model.bank.size={size} asks for {m} centres, but "
                                         r"the pool holds only 4 distinct patches \(of 16\)"):  # fmt: skip
        bank.finalize()
    assert not bool(bank.fitted)
    for count in (4, 16):  # a count is the most centres: each distinct patch once
        bank = MemoryBank(3, 2, 2, **bank_settings("coreset", size=count))
        bank.update(same, torch.arange(4))
        bank.finalize()
        assert bank.n_centres == 4 and len({tuple(c) for c in bank.centres.tolist()}) == 4


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "128"])
def test_projection_dim_is_checked_when_the_bank_is_made(bad):
    with pytest.raises(ValueError, match=r"model.bank.projection_dim=.*>= 1.*or null"):
        MemoryBank(3, 4, 5, **bank_settings("coreset", projection_dim=bad))
    MemoryBank(3, 4, 5, **bank_settings("coreset", projection_dim=None))  # all D' dims: accepted


def test_a_bank_of_another_size_is_refused_naming_both_sizes():
    """Issue 38: a 96-row positional bank (a 32 x 48 input) loaded into a 64 x 64 model."""
    small = MemoryBank(
        3, 8, 12, **bank_settings()
    )  # the feature map of a 32 x 48 input at stride 4
    small.update(torch.randn(2, 3, 8, 12))
    small.finalize()
    with pytest.raises(ValueError, match=r"has 96 centres, but this model's positional bank has "
                                         r"256.*data.image_size or model.bank.size"):  # fmt: skip
        MemoryBank(3, 16, 16, **bank_settings()).load_state_dict(small.state_dict())
    fixed, _ = _pooled("kmeans", 30)
    with pytest.raises(ValueError, match=r"has 30 centres, but this model's kmeans bank has 20"):
        MemoryBank(3, 4, 5, **bank_settings("kmeans", size=20)).load_state_dict(fixed.state_dict())
    capped = MemoryBank(3, 4, 5, **bank_settings("kmeans", size=40))  # a pool of 30 capped it
    capped.load_state_dict(fixed.state_dict())
    assert torch.equal(capped.centres, fixed.centres)


def test_a_checkpoint_of_another_image_size_does_not_load_into_the_model():
    from tiny_models import tiny_cfa

    trained = tiny_cfa(input_size=[32, 48])  # positional: h * w centres
    trained.bank.update(trained.describe(torch.rand(2, 3, 32, 48)))
    trained.bank.finalize()
    assert trained.bank.n_centres == 96
    with pytest.raises(ValueError, match=r"96 centres.*has 256"):
        tiny_cfa(input_size=[64, 64]).load_state_dict(trained.state_dict())  # strict
