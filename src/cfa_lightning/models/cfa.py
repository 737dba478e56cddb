"""The pure CFA model: backbone -> descriptor phi -> memory bank C -> loss and anomaly maps."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..sizes import as_size
from .backbone import Backbone, build_backbone
from .calibration import Calibration
from .descriptor import PatchDescriptor
from .distances import (
    Exclusion,
    block_budget,
    chunk_budget_bytes,
    nearest,
    row_bytes,
    selected_squared_distances,
    smallest_chunk_mb,
    squared_distances,
)
from .loss import CFALoss
from .maps import CFAOutput, GaussianBlur, score_maps
from .memory_bank import MemoryBank

__all__ = ["CFA", "CFAOutput"]


def settings_of(cls: type) -> list[str]:
    """The settings a class takes from the flat model config: its keyword-only parameters (the
    objects it is given, a backbone or a model, come first, positionally)."""
    parameters = inspect.signature(cls).parameters.values()
    return [p.name for p in parameters if p.kind == inspect.Parameter.KEYWORD_ONLY]


class CFA(nn.Module):
    """Coupled-hypersphere-based Feature Adaptation (Lee, Lee & Song 2022), without training policy.

    `forward(images)` takes (B, 3, H, W) images in [0, 1] and returns float32 image scores and
    maps. The bank must be built first (`bank.update` over the training set, `bank.finalize`).
    A pass calls `distances.nearest` once and `maps.score_maps` once.

    The settings have no defaults here: conf/model/cfa.yaml holds them (`from_config`). K and J
    are the loss's. chunk_mb: memory budget of one search block in MB, or "auto" (CPU 32 MB,
    CUDA a share of free memory); `chunk_bytes = None` makes a single block (exported graphs).
    """

    def __init__(
        self,
        backbone: Backbone,
        loss_fn: CFALoss,
        *,
        input_size: int | Sequence[int],
        gamma_c: int,
        gamma_d: int,
        blur_sigma: float,
        kmeans_seed: int,
        chunk_mb: float | str,
        bank: Mapping[str, Any],
        tap_norm: bool,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.input_size = as_size(input_size, "model.input_size")
        self.K, self.J = loss_fn.K, loss_fn.J  # attracted and repelled centres (the search's k)
        self.blur_sigma = blur_sigma
        self.blur = GaussianBlur(blur_sigma)
        self.descriptor = PatchDescriptor(backbone.channels, gamma_d, tap_norm)
        dim = self.descriptor.out_dim  # D'
        with torch.no_grad():  # (h, w) of the first tap at this input size
            h, w = backbone(torch.zeros(1, 3, *self.input_size))[0].shape[-2:]
        # bank: construction, size, max_patches, projection_dim (conf/model/bank/)
        self.bank = MemoryBank(dim, h, w, gamma_c=gamma_c, seed=kmeans_seed, **bank)
        self.chunk_bytes = chunk_budget_bytes(chunk_mb)
        self.check_bank_size(self.bank.n_centres)
        self.loss_fn = loss_fn  # after phi: the optimiser's parameter order of older checkpoints
        self.calibration = Calibration()  # thresholds + normalisation, fitted on validation

    @classmethod
    def from_config(cls, backbone: Mapping[str, Any], **settings: Any) -> CFA:
        """The model of the flat model config (conf/model/cfa.yaml, less the recipe's keys): the
        backbone from its config group, the loss from the keys `CFALoss` takes, the rest here."""
        loss = {key: settings.pop(key) for key in settings_of(CFALoss) if key in settings}
        return cls(build_backbone(backbone), CFALoss(**loss), **settings)

    @classmethod
    def config_keys(cls) -> list[str]:
        """The keys of the flat config that `from_config` reads."""
        return ["backbone", *settings_of(CFALoss), *settings_of(cls)]

    def check_bank_size(self, m: int) -> None:
        """Refuse a bank of m centres that the search (K + J) or the block budget cannot take."""
        k = self.K + self.J
        if m < k:
            raise ValueError(
                f"model.K + model.J = {k} exceeds the {m} centres of the bank; lower "
                "model.gamma_c or raise model.bank.size"
            )
        dim, chunk = self.bank.dim, self.chunk_bytes
        if chunk not in ("auto", None) and chunk < row_bytes(m, dim, k):
            raise ValueError(
                f"model.chunk_mb={chunk / 2**20:.2g} is too small for one row of the "
                f"distance search ({m} centres x {dim} dims); use at least "
                f"{smallest_chunk_mb(m, dim, k)} or auto"
            )

    def check_own_copies(self) -> None:
        """Refuse a bank that would leave some training image fewer than K + J centres besides
        its own copies (the loss leaves those out of the image's search)."""
        k, m, owned = self.K + self.J, self.bank.n_centres, self.bank.most_owned()
        if m - owned < k:
            raise ValueError(
                f"model.bank.size gives {m} centres, and one training image owns {owned} of them "
                f"(its own patches), which leaves it {m - owned} centres from other images; the "
                f"loss needs model.K + model.J = {k}. Raise model.bank.size, or use more "
                "training images"
            )

    def describe(self, images: Tensor, taps: list[Tensor] | None = None) -> Tensor:
        """phi(Z): (B, 3, H, W) -> (B, D', h, w). ``taps``: the frozen backbone's output for these
        images when the caller already has it (validation keeps it across epochs)."""
        return self.descriptor(self.backbone(images) if taps is None else taps)

    @staticmethod
    def flatten_patches(desc: Tensor) -> Tensor:
        """(B, D', h, w) -> (B * h * w, D'), patches of one image contiguous."""
        return desc.permute(0, 2, 3, 1).reshape(-1, desc.shape[1])

    def _require_bank(self) -> None:
        # the check is a host read: eager calls make it; compiled graphs and traces (export.py
        # checks before tracing) leave it out
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return
        if not bool(self.bank.fitted):
            raise RuntimeError(
                "the memory bank is not built; train the model or load a trained checkpoint"
            )

    def loss(
        self,
        images: Tensor,
        naive: bool = False,
        with_output: bool = False,
        taps: list[Tensor] | None = None,
        owners: Tensor | None = None,
    ) -> tuple[Tensor, CFAOutput | None]:
        """Training loss, and optionally the scores and maps of the same pass (no work twice).

        Fast path: top-(K + J) under no_grad (`select`), then only those distances recomputed
        with gradients. `naive=True` backpropagates through the full (patches x centres)
        product; it is the reference the fast path is tested against. ``owners``: the images'
        ids (B,) (`memory_bank.image_ids`); each patch's search then leaves out the centres
        its own image owns (a training image's own copies, memory_bank.py).
        """
        self._require_bank()
        desc = self.describe(images, taps)  # (B, D', h, w)
        p = self.flatten_patches(desc)  # (N, D')
        centres = self.bank.centres  # (M, D')
        k = self.K + self.J
        exclude = self._exclusion(owners, desc.shape[-2] * desc.shape[-1])
        if naive:
            d_all = squared_distances(p, centres)  # (N, M), with autograd
            if exclude is not None:
                own = exclude.patches.unsqueeze(1) == exclude.centres  # (N, M)
                d_all = d_all.masked_fill(own, float("inf"))
            sorted_sq = torch.topk(d_all, k, dim=1, largest=False, sorted=True).values
        else:
            idx = self.select(p.detach(), exclude)  # (N, K + J)
            sorted_sq = selected_squared_distances(p, centres, idx)  # (N, K + J), ascending
        loss = self.loss_fn(sorted_sq)
        if not with_output:
            return loss, None
        return loss, self._output(sorted_sq.detach()[:, : self.K], desc.shape, images.shape[-2:])

    @torch.no_grad()
    def validate(
        self, images: Tensor, taps: list[Tensor] | None = None
    ) -> tuple[Tensor, CFAOutput]:
        """Validation's one pass: each image's training loss alone (B,), and its scores and maps
        (as `forward`'s, from the same K + J nearest centres)."""
        self._require_bank()
        desc = self.describe(images, taps)  # (B, D', h, w)
        sorted_sq, _ = self.nearest(self.flatten_patches(desc), self.K + self.J)  # (N, K + J)
        losses = self.loss_fn.per_image(sorted_sq, len(images))  # (B,)
        return losses, self._output(sorted_sq[:, : self.K], desc.shape, images.shape[-2:])

    def _exclusion(self, owners: Tensor | None, hw: int) -> Exclusion | None:
        """The (patch, centre) pairs a batch's search leaves out; None when no centre is owned."""
        if owners is None or not self.bank.has_owners():
            return None
        centre_owners = self.bank.owners  # (M,)
        return Exclusion(owners.to(centre_owners.device).repeat_interleave(hw), centre_owners)

    def _output(self, nearest_sq: Tensor, desc_shape, out_size) -> CFAOutput:
        """(N, K) nearest squared distances -> float32 image scores and maps at out_size."""
        b, _, h, w = desc_shape
        return score_maps(nearest_sq, (b, h, w), out_size, self.blur)

    def forward(self, images: Tensor, taps: list[Tensor] | None = None) -> CFAOutput:
        self._require_bank()
        desc = self.describe(images, taps)  # (B, D', h, w)
        p = self.flatten_patches(desc)
        nearest_sq, _ = self.nearest(p, self.K)
        return self._output(nearest_sq, desc.shape, images.shape[-2:])

    def select(self, p: Tensor, exclude: Exclusion | None = None) -> Tensor:
        """The loss's no-grad step: indices (N, K + J) of each patch's K + J nearest centres."""
        return self.nearest(p, self.K + self.J, exclude)[1]

    def nearest(self, p: Tensor, k: int, exclude: Exclusion | None = None) -> tuple[Tensor, Tensor]:
        """k nearest centres of (N, D') patches: squared distances (float32, direct differences,
        ascending) and indices, both (N, k); see distances.py."""
        budget = block_budget(self.chunk_bytes, p.device)
        return nearest(p, self.bank.search_index(), k, budget, exclude)
