import pytest
import torch

from cfa_lightning.models.maps import score_maps
from tiny_models import bank_group, tiny_cfa


def _cfa(input_size=(64, 96), chunk_bytes=256 * 2**20, **values):
    """The tests' CFA (tiny_models.py) at this input size and search block budget (bytes)."""
    chunk_mb = chunk_bytes if chunk_bytes == "auto" else chunk_bytes / 2**20
    return tiny_cfa(input_size=list(input_size), chunk_mb=chunk_mb, **values)


def _fitted(input_size=(64, 96), gamma_c=1, chunk_bytes=256 * 2**20, seed=0):
    torch.manual_seed(seed)
    model = _cfa(input_size, chunk_bytes, gamma_c=gamma_c)
    images = torch.rand(5, 3, *input_size)
    model.bank.update(model.describe(images[:3]))
    model.bank.update(model.describe(images[3:]))
    model.bank.finalize()
    return model, images


def test_non_square_input_shapes():
    model, images = _fitted((64, 96), gamma_c=2)
    assert model.bank.centres.shape == ((16 * 24) // 2, 448)  # resnet18: D = 64 + 128 + 256
    out = model(images)
    assert out.maps.shape == (5, 64, 96) and out.image_scores.shape == (5,)
    assert torch.allclose(out.image_scores, out.maps.flatten(1).amax(1))


def _trained_like(chunk_bytes):
    """Near-identical images: every patch lies close to its centre, as after training."""
    torch.manual_seed(1)
    base = torch.rand(1, 3, 64, 96)
    images = (base + 0.02 * torch.randn(5, 3, 64, 96)).clamp(0, 1)
    model = _cfa((64, 96), chunk_bytes)
    model.bank.update(model.describe(images))
    model.bank.finalize()
    return model, images


def _widest_gap(d: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """The middle of the widest gap between the values of d in [low, high].

    A radius with a distance within float32 rounding of r^2 would switch one hinge term on in
    one path and off in the other: one patch's term changed the radius gradient by 1.7%
    here. The naive path's rounding (||p||^2 + ||c||^2 - 2 p.c) depends on the CPU's matmul
    kernels, so a radius merely "between the medians" failed on one CPU and passed on another.
    """
    v = d.flatten().sort().values
    v = v[(v >= low) & (v <= high)]
    i = int((v[1:] - v[:-1]).argmax())
    return 0.5 * (v[i] + v[i + 1])


# 120000 bytes: 3-4 patch rows per block of the search (1920 patches in 480-640 blocks).
@pytest.mark.parametrize("chunk_bytes", [256 * 2**20, 120000, "auto"])
@pytest.mark.parametrize("features", ["random", "trained_like"])
def test_fast_loss_matches_naive_in_value_and_gradients(chunk_bytes, features):
    if features == "random":
        model, images = _fitted(chunk_bytes=chunk_bytes)
        with torch.no_grad():
            # Neighbouring centres of an untrained net can be exactly equidistant from a patch; a
            # tie at the K + J boundary makes the gradient ambiguous: break ties with some noise.
            model.bank.centres.add_(1e-2 * torch.randn_like(model.bank.centres))
    else:
        model, images = _trained_like(chunk_bytes)
    with torch.no_grad():
        # r^2 between the median d_(K) and d_(K+1): both hinge terms are active, and some attracted
        # distances exceed r^2 while others do not, so all K + J columns are compared.
        p = model.flatten_patches(model.describe(images)).double()
        d = torch.cdist(p, model.bank.centres.double()) ** 2
        d = d.topk(model.K + model.J, dim=1, largest=False).values
        r2 = _widest_gap(d, d[:, model.K - 1].median(), d[:, model.K].median())
        model.loss_fn.radius.fill_(float(r2.sqrt()))
        model.loss_fn.alpha = 0.0
        assert (d[:, : model.K] > r2).any() and (d[:, : model.K] < r2).any()
        assert (d[:, model.K :] < r2).any()
    grads = []
    for naive in (False, True):
        model.zero_grad()
        loss, _ = model.loss(images, naive=naive)
        loss.backward()
        weight_grad = model.descriptor.coord_conv.weight.grad.clone()
        grads.append((loss.detach(), weight_grad, model.loss_fn.radius.grad.clone()))
    (l_fast, w_fast, r_fast), (l_naive, w_naive, r_naive) = grads
    assert torch.allclose(l_fast, l_naive, rtol=1e-4)
    assert torch.allclose(w_fast, w_naive, rtol=1e-3, atol=1e-4 * w_naive.abs().max())
    assert torch.allclose(r_fast, r_naive, rtol=1e-4)
    assert r_fast.abs() > 0


def test_training_output_equals_forward_scores():
    model, images = _fitted()
    with torch.no_grad():
        _, out_train = model.loss(images, with_output=True)
        out = model(images)
    assert torch.allclose(out_train.maps, out.maps, atol=1e-4)


def test_identical_images_give_finite_scores():
    model, _ = _fitted()
    img = torch.full((1, 3, 64, 96), 0.5)
    model.bank.reset()
    model.bank.update(model.describe(img.expand(3, -1, -1, -1)))
    model.bank.finalize()
    out = model(img)
    assert torch.isfinite(out.maps).all()
    loss, _ = model.loss(img)
    assert torch.isfinite(loss)


def test_unbuilt_bank_is_a_clear_error():
    model = _cfa((64, 64))
    with pytest.raises(RuntimeError, match="memory bank is not built"):
        model(torch.rand(1, 3, 64, 64))


def test_kmeans_bank_fast_loss_and_maps_match_brute_force():
    # gamma_c > 1: the centres are k-means centres.
    model, images = _fitted(gamma_c=3, seed=2)
    with torch.no_grad():
        model.bank.centres.add_(1e-2 * torch.randn_like(model.bank.centres))  # no exact ties
        maps = model(images).maps
        p = model.flatten_patches(model.describe(images))
        d = torch.cdist(p.double(), model.bank.centres.double()).pow(2)
        ref = d.topk(model.K + model.J, dim=1, largest=False).values  # float64 brute force
        ref_maps = score_maps(ref[:, : model.K].float(), (5, 16, 24), (64, 96), model.blur).maps
    assert torch.allclose(maps, ref_maps, rtol=1e-5, atol=1e-6)
    loss, _ = model.loss(images)
    with torch.no_grad():
        assert torch.allclose(loss, model.loss_fn(ref.float()), rtol=1e-5)


def test_chunk_budget_too_small_for_one_row_is_refused_with_the_smallest_that_works():
    with pytest.raises(ValueError, match=r"model.chunk_mb=0.001 .* use at least 0.\d+ or auto"):
        _cfa((64, 64), 2**20 // 1000)
    from cfa_lightning.models.distances import smallest_chunk_mb

    smallest = smallest_chunk_mb(16 * 16, 448, 6)
    _cfa((64, 64), int(smallest * 2**20))  # accepted


@pytest.mark.slow  # 30-55 s on 2 cores: keeps `make test` under 10 minutes
def test_forward_and_the_loss_selection_trace_without_graph_breaks():
    """CPU proxy for 'no host sync or data-dependent branch per block': dynamo must capture the
    whole scoring pass and the loss's no-grad selection as one graph each."""
    model, images = _fitted(chunk_bytes=120000)  # many blocks
    with torch.no_grad():
        p = model.flatten_patches(model.describe(images))
        eager, eager_idx = model(images), model.select(p)
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, fullgraph=True, backend="eager")(images)
    select = torch.compile(model.select, fullgraph=True, backend="eager")(p)
    assert torch.equal(compiled.maps, eager.maps) and torch.equal(select, eager_idx)


def _every_patch_bank(n_images=4, size=1.0):
    """A coreset of every patch of the training images: each patch's own copy is in the bank."""
    torch.manual_seed(3)
    model = _cfa((32, 32), "auto", K=1, J=3, bank=bank_group("coreset", size=size))
    images, ids = torch.rand(n_images, 3, 32, 32), torch.arange(n_images) + 50
    model.bank.update(model.describe(images), ids)
    model.bank.finalize()
    return model, images, ids


@pytest.mark.parametrize("chunk_bytes", [256 * 2**20, 20000])
def test_own_copies_leave_the_training_search(chunk_bytes):
    model, images, ids = _every_patch_bank()
    model.chunk_bytes = chunk_bytes  # 20000 bytes: a few patch rows per block
    with torch.no_grad():
        alone, _ = model.loss(images)  # each patch finds itself: only the radius term is left
        fast, _ = model.loss(images, owners=ids)
        naive, _ = model.loss(images, owners=ids, naive=True)
        p = model.flatten_patches(model.describe(images)).double()
        d = torch.cdist(p, model.bank.centres.double()).pow(2)  # (N, M)
        own = ids.repeat_interleave(p.shape[0] // 4).unsqueeze(1) == model.bank.owners
        ref = d.masked_fill(own, float("inf")).topk(4, dim=1, largest=False).values
    assert alone.abs() < 1e-3 * fast  # the bank's own copies: no pull at all
    assert torch.allclose(fast, model.loss_fn(ref.float()), rtol=1e-4)
    assert torch.allclose(naive, fast, rtol=1e-4)
    # the scores of a test image (no owner) are not affected: forward never excludes
    assert torch.allclose(model(images).image_scores, torch.zeros(4), atol=1e-3)


def test_bank_that_leaves_an_image_too_few_other_centres_is_refused():
    model, _, _ = _every_patch_bank(n_images=2, size=1.0)
    model.check_own_copies()  # 64 patches each: 64 others left for K + J = 4
    model, _, _ = _every_patch_bank(n_images=1, size=1.0)  # one image owns every centre
    with pytest.raises(
        ValueError, match=r"model.bank.size gives 64 centres.*owns 64.*K \+ model.J = 4"
    ):
        model.check_own_copies()


def test_the_validation_pass_gives_each_images_loss_and_the_forward_scores():
    model, images = _fitted()
    with torch.no_grad():
        losses, out = model.validate(images)
        alone = torch.cat([model.loss(images[i : i + 1])[0].view(1) for i in range(len(images))])
        batch, _ = model.loss(images)
        scored = model(images)
    assert losses.shape == (len(images),)
    assert torch.allclose(losses, alone, rtol=1e-5)  # each image's training loss alone
    assert torch.allclose(losses.mean(), batch, rtol=1e-5)
    assert torch.allclose(out.maps, scored.maps, atol=1e-4)
    assert torch.allclose(out.image_scores, scored.image_scores, atol=1e-4)
