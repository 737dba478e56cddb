"""The pure CFA model: backbone -> descriptor phi -> memory bank C -> loss and anomaly maps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..sizes import as_size
from .backbone import Backbone
from .calibration import Calibration
from .descriptor import PatchDescriptor
from .loss import CFALoss
from .memory_bank import MemoryBank
from .scoring import (
    DEFAULT_CHUNK_BYTES,
    GaussianBlur,
    anomaly_map,
    patch_scores,
    selected_squared_distances,
    squared_distances,
)
from .search import SearchStats, nearest


class CFAOutput(NamedTuple):
    image_scores: Tensor  # (B,) max of the blurred map
    maps: Tensor  # (B, H, W) blurred anomaly map at the input resolution


class CFA(nn.Module):
    """Coupled-hypersphere-based Feature Adaptation (Lee, Lee & Song 2022), without training policy.

    `forward(images)` takes (B, 3, H, W) images in [0, 1] and returns image scores and maps. The
    bank must be built first (`bank.update` over the training set, then `bank.finalize`).
    """

    def __init__(
        self,
        backbone: Backbone,
        input_size: int | Sequence[int] = 256,
        gamma_c: int = 1,
        gamma_d: int = 1,
        K: int = 3,
        J: int = 3,
        alpha: float = 0.1,
        nu: float = 1e-3,
        radius: float = 1e-5,
        learn_radius: bool = True,
        blur_sigma: float = 4.0,
        kmeans_seed: int = 0,
        chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
        search_dims: int | None = None,
        search_groups: int | None = None,
        prune: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.input_size = as_size(input_size, "model.input_size")
        self.K, self.J = K, J
        self.blur_sigma = blur_sigma
        self.blur = GaussianBlur(blur_sigma)
        self.chunk_bytes = chunk_bytes
        self.descriptor = PatchDescriptor(backbone.channels, gamma_d)
        dim = self.descriptor.out_dim  # D'
        if search_dims is not None and not 1 <= search_dims <= dim:
            raise ValueError(
                f"model.search_dims={search_dims} is outside the valid range 1..{dim} (D'); "
                "null chooses it when the bank is built"
            )
        self.search_dims, self.prune = search_dims, prune
        self.last_search: SearchStats | None = None  # what the last nearest-centre search did
        with torch.no_grad():  # (h, w) of the first tap at this input size
            h, w = backbone(torch.zeros(1, 3, *self.input_size))[0].shape[-2:]
        self.bank = MemoryBank(
            dim, h, w, gamma_c=gamma_c, seed=kmeans_seed, search_groups=search_groups
        )
        if self.bank.n_centres < K + J:
            raise ValueError(
                f"model.K + model.J = {K + J} exceeds the {self.bank.n_centres} centres of the bank; "
                "lower model.gamma_c"
            )
        self.loss_fn = CFALoss(
            K=K, J=J, alpha=alpha, nu=nu, radius=radius, learn_radius=learn_radius
        )
        self.calibration = Calibration()  # thresholds + normalisation, fitted on validation

    def describe(self, images: Tensor) -> Tensor:
        """phi(Z): (B, 3, H, W) -> (B, D', h, w)."""
        return self.descriptor(self.backbone(images))

    @staticmethod
    def flatten_patches(desc: Tensor) -> Tensor:
        """(B, D', h, w) -> (B * h * w, D'), patches of one image contiguous."""
        return desc.permute(0, 2, 3, 1).reshape(-1, desc.shape[1])

    def _require_bank(self) -> None:
        if not bool(self.bank.fitted):
            raise RuntimeError(
                "the memory bank is not built; train the model or load a trained checkpoint"
            )

    def loss(
        self, images: Tensor, naive: bool = False, with_output: bool = False
    ) -> tuple[Tensor, CFAOutput | None]:
        """Training loss, and optionally the scores and maps of the same pass (no work twice).

        Fast path: top-(K + J) under no_grad in chunks, then only those distances recomputed with
        gradients. `naive=True` backpropagates through the full (patches x centres) product; it is
        the reference the fast path is tested against.
        """
        self._require_bank()
        desc = self.describe(images)  # (B, D', h, w)
        p = self.flatten_patches(desc)  # (N, D')
        centres = self.bank.centres  # (M, D')
        k = self.K + self.J
        if naive:
            d_all = squared_distances(p, centres)  # (N, M), with autograd
            sorted_sq = torch.topk(d_all, k, dim=1, largest=False, sorted=True).values
        else:
            _, idx = self.nearest(p.detach(), k)
            sorted_sq = selected_squared_distances(p, centres, idx, self.chunk_bytes)  # (N, K + J)
        loss = self.loss_fn(sorted_sq)
        if not with_output:
            return loss, None
        return loss, self._output(sorted_sq.detach()[:, : self.K], desc.shape, images.shape[-2:])

    def _output(self, nearest_sq: Tensor, desc_shape, out_size) -> CFAOutput:
        """(N, K) nearest squared distances -> image scores and blurred maps at out_size."""
        b, _, h, w = desc_shape
        scores = patch_scores(nearest_sq).view(b, h, w)  # (B, h, w)
        maps = anomaly_map(scores, tuple(out_size), self.blur)  # (B, H, W)
        return CFAOutput(maps.flatten(1).amax(dim=1), maps)

    def forward(self, images: Tensor) -> CFAOutput:
        self._require_bank()
        desc = self.describe(images)  # (B, D', h, w)
        p = self.flatten_patches(desc)
        nearest_sq, _ = self.nearest(p, self.K)
        return self._output(nearest_sq, desc.shape, images.shape[-2:])

    def nearest(self, p: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Exact k nearest centres of (N, D') patches: squared distances (direct differences,
        float32, ascending) and indices, both (N, k). With `prune`, centre groups and principal
        directions of the bank rule most centres out first; see search.py."""
        index = self.bank.search_index(pruned=self.prune, dims=self.search_dims)
        result = nearest(p, index, k, self.chunk_bytes)
        self.last_search = result.stats
        return result.values, result.indices
