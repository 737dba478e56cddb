"""model.lr_schedule: cosine decays from lr over the trained epochs (also with the untrained epoch 0)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from tiny_models import tiny_module


def _rates(schedule: str, max_epochs: int, untrained_epoch: bool) -> list[float]:
    module = tiny_module(lr=1e-3, lr_schedule=schedule, untrained_epoch=untrained_epoch)
    module._trainer = SimpleNamespace(max_epochs=max_epochs)  # all configure_optimizers reads
    config = module.configure_optimizers()
    if schedule == "none":
        return [config.param_groups[0]["lr"]] * max_epochs
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "epoch"
    rates = []
    for _ in range(max_epochs):  # Lightning steps an epoch-interval scheduler after each epoch
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_cosine_decays_over_the_trained_epochs():
    expected = [1e-3 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert _rates("cosine", 4, False) == pytest.approx(expected)
    # a validated fit has max_epochs + 1 Lightning epochs, epoch 0 trains nothing
    assert _rates("cosine", 5, True) == pytest.approx([1e-3, *expected])


def test_none_is_the_constant_rate():
    assert _rates("none", 3, False) == [1e-3] * 3


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="model.lr_schedule"):
        tiny_module(lr_schedule="step")
