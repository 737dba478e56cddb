"""AUPRO: area under the per-region-overlap curve, MVTec AD's localisation metric.

Definition (Bergmann et al., MVTec AD, IJCV 2021), as in the "Evaluation
protocol" of ``docs/method.md``:

- the ground truth of every image is split into connected regions with
  8-connectivity (``scipy.ndimage.label`` with a 3 x 3 block of ones, as in
  MVTec's own evaluation code); regions never span two images;
- for a threshold t, PRO(t) is the mean over all regions of all images of the
  fraction of the region's pixels scored >= t, and FPR(t) is the fraction of
  all normal pixels (mask 0, all images) scored >= t;
- AUPRO is the trapezoid area under PRO over FPR from 0 to ``fpr_limit``
  (linear interpolation at ``fpr_limit``), divided by ``fpr_limit``. The PRO
  axis is not rescaled.

The curve is exact: one sort of all pixels, cumulative sums, one curve point per
distinct score, starting at (0, 0).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor
from torchmetrics.utilities.distributed import gather_all_tensors

# 8-connectivity inside one image and none across images: labelling the whole
# (N, H, W) stack at once with this structure gives every region a global id.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True


def as_image_stack(maps: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """Check shapes and types; return (N, H, W) float32 maps and bool masks on the CPU."""
    if maps.ndim == 4 and maps.shape[1] == 1:  # (N, 1, H, W) -> (N, H, W)
        maps = maps.squeeze(1)
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks.squeeze(1)
    if maps.ndim != 3 or maps.shape != masks.shape:
        raise ValueError(
            f"anomaly maps and masks must both be (N, H, W) of the same shape; "
            f"got maps {tuple(maps.shape)} and masks {tuple(masks.shape)}"
        )
    maps = maps.detach().to("cpu", torch.float32)
    masks = masks.detach().to("cpu")
    if not torch.isfinite(maps).all():
        raise ValueError("anomaly maps contain NaN or inf values; check the model's scoring")
    return maps, as_bool_mask(masks)


def as_bool_mask(masks: Tensor) -> Tensor:
    """Return ``masks`` as bool; non-bool masks must hold only 0 and 1."""
    if masks.dtype == torch.bool:
        return masks
    if masks.numel() and not ((masks == 0) | (masks == 1)).all():
        raise ValueError(
            "ground-truth masks must be bool or hold only 0 and 1; binarise them first "
            "(docs/method.md, Evaluation protocol: value > 127 after nearest-neighbour resizing)"
        )
    return masks != 0


def _label_regions(masks: Tensor) -> tuple[Tensor, Tensor]:
    """Label the 8-connected ground-truth regions of a (N, H, W) bool stack.

    Returns the flat region id of every pixel (int32, 0 = normal, 1..R across
    all images) and the pixel count of every id (int64, length R + 1).
    """
    region_ids, n_regions = ndimage.label(masks.numpy(), structure=_REGION_STRUCTURE)
    region_ids = torch.from_numpy(region_ids).reshape(-1)  # (N * H * W,) int32
    sizes = torch.bincount(region_ids, minlength=n_regions + 1)  # (R + 1,)
    return region_ids, sizes


def _check_defined(n_regions: int, n_normal: int) -> str | None:
    """Return why the PRO curve is undefined, or None when it is defined."""
    if n_regions == 0:
        return "the ground-truth masks contain no anomalous region"
    if n_normal == 0:
        return "the ground-truth masks contain no normal pixel"
    return None


def _pro_curve(maps: Tensor, masks: Tensor, fpr_stop: float | None = None) -> tuple[Tensor, Tensor]:
    """Exact PRO curve of a (N, H, W) stack; keep points up to the first FPR above ``fpr_stop``."""
    region_ids, sizes = _label_regions(masks)
    n_regions, n_normal = sizes.numel() - 1, int(sizes[0])
    reason = _check_defined(n_regions, n_normal)
    if reason is not None:
        raise ValueError(f"the PRO curve is undefined: {reason}")

    scores = maps.reshape(-1)  # (P,) float32
    sorted_scores, order = torch.sort(scores, descending=True)  # (P,), (P,) int64
    # Index of the last pixel of every run of tied scores: one curve point per distinct score.
    run_ends = torch.ones_like(sorted_scores, dtype=torch.bool)
    torch.ne(sorted_scores[1:], sorted_scores[:-1], out=run_ends[:-1])
    del sorted_scores
    ends = run_ends.nonzero().reshape(-1)  # (T,) int64
    del run_ends

    sorted_ids = region_ids[order]  # (P,) int32
    del order

    # FPR(t): normal pixels among the pixels scored >= t, over all normal pixels.
    false_pos = torch.cumsum(sorted_ids == 0, dim=0)[ends]  # (T,) int64
    fpr = false_pos.double() / n_normal
    del false_pos
    if fpr_stop is not None:
        # Keep the first point beyond fpr_stop too, for the interpolation there.
        n_keep = int(torch.searchsorted(fpr, torch.tensor([fpr_stop], dtype=fpr.dtype), right=True))
        n_keep = min(n_keep + 1, fpr.numel())
        fpr, ends = fpr[:n_keep], ends[:n_keep]
        sorted_ids = sorted_ids[: int(ends[-1]) + 1]

    # PRO(t): each pixel of region r adds 1 / (R * |r|); normal pixels add 0.
    pixel_weight = 1.0 / (n_regions * sizes.double())  # (R + 1,)
    pixel_weight[0] = 0.0
    pro = pixel_weight[sorted_ids].cumsum_(dim=0)[ends]  # (T,) float64

    origin = torch.zeros(1, dtype=torch.float64)
    return torch.cat([origin, fpr]), torch.cat([origin, pro])


def compute_pro_curve(maps: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """Exact per-region-overlap curve of anomaly maps against ground-truth masks.

    Args:
        maps: (N, H, W) (or (N, 1, H, W)) anomaly maps, higher = more anomalous.
        masks: same shape, bool or 0/1 ground truth.

    Returns:
        (fpr, pro), float64, one point per distinct score in decreasing-score order,
        starting at (0, 0) and ending at (1, 1).

    Raises:
        ValueError: when the masks hold no anomalous region or no normal pixel.
    """
    return _pro_curve(*as_image_stack(maps, masks))


def _trapezoid_to(fpr: Tensor, pro: Tensor, fpr_limit: float) -> float:
    """Trapezoid area under (fpr, pro) on [0, fpr_limit], interpolating linearly at the limit."""
    limit = torch.tensor([fpr_limit], dtype=fpr.dtype)
    n_in = int(torch.searchsorted(fpr, limit, right=True))  # fpr[:n_in] <= fpr_limit
    x, y = fpr[:n_in], pro[:n_in]
    if n_in < fpr.numel():  # fpr[n_in - 1] <= fpr_limit < fpr[n_in]
        x0, x1, y0, y1 = fpr[n_in - 1], fpr[n_in], pro[n_in - 1], pro[n_in]
        y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        x, y = torch.cat([x, limit]), torch.cat([y, y_limit])
    return float(torch.trapezoid(y, x))


def compute_aupro(maps: Tensor, masks: Tensor, fpr_limit: float = 0.3) -> float:
    """AUPRO: area under the PRO curve for FPR in [0, fpr_limit], divided by fpr_limit.

    Returns ``nan`` (with a warning) when the masks hold no anomalous region or
    no normal pixel, since the curve is then undefined.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must lie in (0, 1]; got {fpr_limit}")
    maps, masks = as_image_stack(maps, masks)
    n_anomalous = int(masks.sum())
    if n_anomalous == 0 or n_anomalous == masks.numel():
        reason = _check_defined(n_anomalous, masks.numel() - n_anomalous)
        warnings.warn(f"AUPRO is undefined (returning nan): {reason}", stacklevel=2)
        return float("nan")
    fpr, pro = _pro_curve(maps, masks, fpr_stop=fpr_limit)
    return _trapezoid_to(fpr, pro, fpr_limit) / fpr_limit


def gather_cpu_tensors(tensor: Tensor, group: object | None = None) -> list[Tensor]:
    """``all_gather`` for metric states kept on the CPU.

    NCCL moves only CUDA tensors, so under an NCCL-only process group the state
    hops through the current GPU and comes back to the CPU.
    """
    if tensor.device.type == "cpu" and torch.distributed.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
        return [part.cpu() for part in gather_all_tensors(tensor.to(device), group)]
    return gather_all_tensors(tensor, group)
