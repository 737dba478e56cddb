import pytest
import torch

from cfa_lightning.models.loss import CFALoss

# The loss has no defaults (conf/model/cfa.yaml holds them): each test gives all six settings.
SETTINGS = {"K": 1, "J": 3, "alpha": 0.1, "nu": 1e-3, "radius": 1e-5, "learn_radius": True}


def loss_with(**given) -> CFALoss:
    return CFALoss(**{**SETTINGS, **given})


def test_negatives_are_sliced_from_K_not_J():
    # K = 1, J = 2, r = 2 (r^2 = 4), alpha = 0.1, nu = 1e-3
    loss_fn = loss_with(K=1, J=2, alpha=0.1, nu=1e-3, radius=2.0)
    d = torch.tensor([[0.5, 1.0, 3.5, 9.0], [5.0, 6.0, 7.0, 8.0]])
    # L_att = mean(max(0, [0.5, 5.0] - 4)) = (0 + 1) / 2 = 0.5
    # L_rep over d[:, 1:3]: max(0, 4 - [1.0, 3.5, 6.0, 7.0] - 0.1) = [2.9, 0.4, 0, 0] -> mean 0.825
    # (slicing from J = 2 would take [3.5, 9.0, 7.0, 8.0] and give 0.1)
    expected = (0.5 + 0.825) / 1e-3
    assert loss_fn(d).item() == pytest.approx(expected, rel=1e-5)


def test_radius_is_a_learnable_parameter_with_gradient():
    loss_fn = loss_with(K=2, J=2, alpha=0.1, nu=1e-3, radius=1.5)
    assert isinstance(loss_fn.radius, torch.nn.Parameter) and loss_fn.radius.requires_grad
    d = torch.tensor([[0.1, 3.0, 2.3, 5.0]])
    loss_fn(d).backward()
    # r^2 = 2.25. Attract [0.1, 3.0]: only 3.0 is outside, d/dr mean = -2r / 2 = -1.5.
    # Repel [2.3, 5.0]: 2.25 - 2.3 - 0.1 < 0, inactive. So dL/dr = -1.5 / nu.
    assert loss_fn.radius.grad.item() == pytest.approx(-1500.0, rel=1e-5)


def test_repulsion_reaches_radius_gradient():
    loss_fn = loss_with(K=1, J=1, alpha=0.1, nu=1e-3, radius=2.0)
    d = torch.tensor([[4.5, 1.0]])  # attract active (4.5 > 4), repel active (4 - 1 - 0.1 > 0)
    loss_fn(d).backward()
    # the two terms pull r in opposite directions by 2r each: dL/dr = (-2r + 2r) / nu = 0
    assert loss_fn.radius.grad.item() == pytest.approx(0.0, abs=1e-6)
    loss_fn.radius.grad = None
    loss_fn(torch.tensor([[1.0, 1.0]])).backward()  # only repel active: d/dr (r^2 - 1.1) = 2r = 4
    assert loss_fn.radius.grad.item() == pytest.approx(4.0 / 1e-3, rel=1e-5)


def test_frozen_radius_and_bad_values():
    assert not loss_with(learn_radius=False).radius.requires_grad
    with pytest.raises(ValueError, match="model.radius"):
        loss_with(radius=float("nan"))
    with pytest.raises(ValueError, match="model.K"):
        loss_with(K=0)


@pytest.mark.parametrize("J", [2, 0])
def test_each_images_loss_alone_averages_to_the_batch_loss(J):
    loss_fn = loss_with(K=1, J=J, alpha=0.1, nu=1e-3, radius=2.0)
    d = torch.tensor([[0.5, 1.0, 3.5], [5.0, 6.0, 7.0], [4.5, 4.6, 9.0], [0.1, 0.2, 0.3]])
    per_image = loss_fn.per_image(d, 2)  # two images of two patches each
    assert per_image.shape == (2,)
    assert per_image[0].item() == pytest.approx(loss_fn(d[:2]).item(), rel=1e-6)
    assert per_image[1].item() == pytest.approx(loss_fn(d[2:]).item(), rel=1e-6)
    assert per_image.mean().item() == pytest.approx(loss_fn(d).item(), rel=1e-6)
