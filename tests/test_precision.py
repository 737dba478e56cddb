"""A precision the device cannot run stops at once, naming trainer.precision (capability faked)."""

from __future__ import annotations

import pytest
import torch
from hydra import compose

from cfa_lightning import precision as precision_module
from cfa_lightning.precision import PrecisionError, check_precision


def fake_gpu(monkeypatch, bf16: bool) -> list[dict]:
    """A CUDA GPU named "Tesla T4" whose bf16 support is `bf16`; records the capability queries."""
    calls: list[dict] = []

    def is_bf16_supported(**kwargs) -> bool:
        calls.append(kwargs)
        return bf16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    return calls


@pytest.mark.parametrize("accelerator", ["auto", "gpu", "cuda"])
def test_bf16_on_a_gpu_without_it_names_the_option(monkeypatch, accelerator):
    calls = fake_gpu(monkeypatch, bf16=False)
    with pytest.raises(PrecisionError) as err:
        check_precision({"precision": "bf16-mixed", "accelerator": accelerator})
    message = str(err.value)
    assert message.startswith("error: trainer.precision=bf16-mixed") and "Tesla T4" in message
    assert "16-mixed or 32-true" in message and "\n" not in message  # what to do, in one line
    assert calls == [{"including_emulation": False}]  # native support, not emulation


@pytest.mark.parametrize(
    ("trainer", "bf16"),
    [
        ({"precision": "bf16-mixed", "accelerator": "gpu"}, True),  # the GPU has bf16
        ({"precision": "bf16-mixed", "accelerator": "cpu"}, False),  # CPU autocast runs bf16
        ({"precision": "32-true", "accelerator": "gpu"}, False),
        ({"precision": "16-mixed", "accelerator": "auto"}, False),
    ],
)
def test_runnable_precisions_pass(monkeypatch, trainer, bf16):
    fake_gpu(monkeypatch, bf16=bf16)
    check_precision(trainer)


def test_without_a_gpu_bf16_passes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_precision({"precision": "bf16-mixed", "accelerator": "auto"})  # lands on the CPU


def test_an_older_torch_without_the_emulation_argument(monkeypatch):
    fake_gpu(monkeypatch, bf16=True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert precision_module.native_bf16() is False


def test_train_stops_before_any_work(monkeypatch, hydra_ctx):
    from cfa_lightning import train

    fake_gpu(monkeypatch, bf16=False)
    cfg = compose("train", overrides=["+experiment=demo", "trainer.accelerator=gpu",
                                      "trainer.precision=bf16-mixed"])  # fmt: skip
    monkeypatch.setattr(train, "instantiate", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(PrecisionError, match=r"trainer\.precision=bf16-mixed"):
        train.train(cfg)
