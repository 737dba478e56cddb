"""The frozen backbone's taps of each image, kept across the epochs of a fit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor, nn


def tap_cache_bytes(tap_cache_mb: float) -> int:
    """model.tap_cache_mb -> the TapCache budget in bytes (0: keep no taps)."""
    number = isinstance(tap_cache_mb, int | float) and not isinstance(tap_cache_mb, bool)
    if not number or tap_cache_mb < 0:
        raise ValueError(f"model.tap_cache_mb={tap_cache_mb!r}; give a number of MB >= 0 (0: none)")
    return int(tap_cache_mb * 2**20)


class TapCache:
    """Per-image taps of the frozen backbone, reused by later epochs of the same fit.

    The backbone never trains and CFA draws no augmentation, so an image's taps are the same in
    every epoch: the bank build keeps those of the training images and the first validation
    those of the validation images and their synthetic defects. Later training steps and
    validations run only phi and the search. Keyed by image path; images past ``max_bytes``
    are recomputed every time, and a batch with any such image is recomputed whole. Outside a
    fit (test, predict, a bare model) nothing is kept.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.clear()

    def clear(self) -> None:
        self._taps: dict[str, list[Tensor]] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._taps)

    def for_batch(
        self, trainer: Any, backbone: nn.Module, images: Tensor, paths: Sequence[str] | None
    ) -> list[Tensor]:
        """The backbone's taps of a batch, [(B, C_l, h_l, w_l)]: kept only while a fit runs."""
        state = getattr(trainer, "state", None)  # no trainer, or a stand-in without one
        if state is None or state.fn != TrainerFn.FITTING:
            return backbone(images)
        return self.taps(backbone, images, paths)

    def taps(
        self, backbone: nn.Module, images: Tensor, paths: Sequence[str] | None
    ) -> list[Tensor]:
        if paths is None or self.max_bytes <= 0:
            return backbone(images)
        kept = [self._taps.get(path) for path in paths]
        # Taps kept under inference mode (validation) cannot enter autograd (a training step).
        usable = torch.is_inference_mode_enabled() or not any(
            k is not None and k[0].is_inference() for k in kept
        )
        if usable and all(k is not None for k in kept):
            return [torch.cat(level) for level in zip(*kept, strict=True)]
        taps = backbone(images)
        for i, path in enumerate(paths):
            if path in self._taps:
                continue
            one = [t[i : i + 1].clone() for t in taps]  # (1, C_l, h_l, w_l), its own storage
            size = sum(t.numel() * t.element_size() for t in one)
            if self.bytes + size > self.max_bytes:
                break
            self._taps[path] = one
            self.bytes += size
        return taps
