import pytest
import torch

from cfa_lightning.models.backbone import Backbone
from cfa_lightning.models.cfa import CFA


def _fitted(input_size=(64, 96), gamma_c=1, chunk_bytes=256 * 2**20, seed=0):
    torch.manual_seed(seed)
    model = CFA(Backbone("resnet18", pretrained=False), input_size=input_size, gamma_c=gamma_c,
                chunk_bytes=chunk_bytes)  # fmt: skip
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
    model = CFA(
        Backbone("resnet18", pretrained=False), input_size=(64, 96), chunk_bytes=chunk_bytes
    )
    model.bank.update(model.describe(images))
    model.bank.finalize()
    return model, images


# 37000 bytes: 7 patch rows per block of the search (1920 patches: a ragged last block of 2).
@pytest.mark.parametrize("chunk_bytes", [256 * 2**20, 37000])
@pytest.mark.parametrize("features", ["random", "trained_like"])
def test_fast_loss_matches_naive_in_value_and_gradients(chunk_bytes, features):
    if features == "random":
        model, images = _fitted(chunk_bytes=chunk_bytes)
        with torch.no_grad():
            # Neighbouring centres of an untrained net can be exactly equidistant from a patch; a
            # tie at the K + J boundary makes the gradient ambiguous: break ties with some noise.
            model.bank.centres.add_(1e-2 * torch.randn_like(model.bank.centres))
            model.bank.fit_search()
    else:
        model, images = _trained_like(chunk_bytes)
    with torch.no_grad():
        # r^2 between the median d_(K) and d_(K+1): both hinge terms are active, and some attracted
        # distances exceed r^2 while others do not, so all K + J columns are compared.
        d = torch.cdist(model.flatten_patches(model.describe(images)), model.bank.centres) ** 2
        d = d.topk(model.K + model.J, dim=1, largest=False).values
        r2 = 0.5 * (d[:, model.K - 1].median() + d[:, model.K].median())
        model.loss_fn.radius.fill_(float(r2.sqrt()))
        model.loss_fn.alpha = 0.0
        assert (d[:, : model.K] > r2).any() and (d[:, : model.K] < r2).any()
        assert (d[:, model.K :] < r2).any()
    grads = []
    for naive in (False, True):
        model.zero_grad()
        loss, _ = model.loss(images, naive=naive)
        loss.backward()
        grads.append((loss.detach(), model.descriptor.coord_conv.weight.grad.clone(),
                      model.loss_fn.radius.grad.clone()))  # fmt: skip
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
    model = CFA(Backbone("resnet18", pretrained=False), input_size=64)
    with pytest.raises(RuntimeError, match="memory bank is not built"):
        model(torch.rand(1, 3, 64, 64))


def test_pruned_search_scores_equal_dense_ones():
    model, images = _trained_like(256 * 2**20)
    with torch.no_grad():
        dense = model(images)
        model.prune, model.search_dims = True, 8
        pruned = model(images)
    assert model.last_search.dense_patches < images.shape[0] * 16 * 24
    assert torch.equal(pruned.maps, dense.maps)


@pytest.mark.parametrize("prune", [False, True])
def test_kmeans_bank_pruned_search_matches_dense_in_loss_and_maps(prune):
    # gamma_c > 1: the centres are k-means centres, the groups a k-means of those.
    model, images = _fitted(gamma_c=3, seed=2)
    with torch.no_grad():
        model.bank.centres.add_(1e-2 * torch.randn_like(model.bank.centres))  # no exact ties
        model.bank.fit_search()
        maps = model(images).maps
    loss_dense, _ = model.loss(images)
    model.prune = prune
    loss, _ = model.loss(images)
    with torch.no_grad():
        assert torch.equal(model(images).maps, maps)
    assert torch.equal(loss, loss_dense)


def test_projection_option_outside_range_is_refused():
    with pytest.raises(ValueError, match=r"1\.\.448"):
        CFA(Backbone("resnet18", pretrained=False), input_size=64, search_dims=449)
