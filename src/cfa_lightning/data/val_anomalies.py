"""Validation with synthetic anomalies: the held-out normal images, as they are and with defects.

Every validation image is scored twice: as it is (label 0) and, ``per_image`` times, with a
synthetic defect drawn by ``defects.py`` (label 1, an exact mask). The defects are drawn once,
in ``setup``, at the model's resolution (after resize and crop), deterministically from
``seed``; they never depend on the training seed, so every trial of a sweep validates on the
same anomalies. Only validation images are used, as images and as pasted content: no test
image, and no external data set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset

from .defects import check_families, draw_defect

__all__ = ["SyntheticAnomalyConfig", "SyntheticValidationSet"]

SYNTHETIC_PREFIX = "synthetic_"  # defect_type of a synthetic anomaly: synthetic_<family>


class SyntheticAnomalyConfig:
    """Options of ``data.synthetic_anomalies``. Their defaults live in one file,
    ``conf/validation/synthetic.yaml``, which every data config and :meth:`from_mapping` read."""

    DEFAULTS = Path(__file__).resolve().parents[1] / "conf" / "validation" / "synthetic.yaml"

    def __init__(
        self, *, families: str | Sequence[str], per_image: int, seed: int, min_images: int
    ) -> None:
        self.families = check_families(families, "data.synthetic_anomalies.families")
        if int(per_image) < 1:
            raise ValueError(f"data.synthetic_anomalies.per_image must be >= 1, got {per_image}")
        self.per_image = int(per_image)
        self.seed = int(seed)
        self.min_images = max(2, int(min_images))

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> SyntheticAnomalyConfig:
        """The options given, the rest from ``conf/validation/synthetic.yaml``."""
        defaults = OmegaConf.to_container(OmegaConf.load(cls.DEFAULTS))
        options = dict(options or {})
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            raise ValueError(
                f"data.synthetic_anomalies: unknown option(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(defaults))}"
            )
        return cls(**{**defaults, **options})


class SyntheticValidationSet(Dataset):
    """Normal validation images, their synthetic-defect copies, then the split's real anomalies
    (``real``, e.g. the defect folders of ``data.val_dir``), all in memory.

    Items are those of :class:`~cfa_lightning.data.dataset.AnomalyDataset` plus ``synthetic``
    (bool). The k-th copy of image i uses family ``families[(i * per_image + k) % F]``, so the
    families are balanced, and the generator ``default_rng([seed, i, k])``. Defects are drawn
    on, and pasted from, the normal images only.
    """

    def __init__(
        self, normal: Dataset, config: SyntheticAnomalyConfig, real: Dataset | None = None
    ) -> None:
        items = [normal[i] for i in range(len(normal))]  # decoded once, (3, H, W) in [0, 1]
        arrays = [item["image"].permute(1, 2, 0).numpy() for item in items]  # (H, W, 3)
        self.items: list[dict[str, Any]] = []
        for item in items:
            self.items.append({**item, "synthetic": torch.tensor(False)})
        n_families = len(config.families)
        for i, (item, image) in enumerate(zip(items, arrays, strict=True)):
            for k in range(config.per_image):
                family = config.families[(i * config.per_image + k) % n_families]
                rng = np.random.default_rng([config.seed, i, k])
                defective, mask = draw_defect(family, rng, image, sources=arrays)
                self.items.append(
                    {
                        "image": torch.from_numpy(np.ascontiguousarray(defective, np.float32)),
                        "mask": torch.from_numpy(mask)[None].float(),  # (1, H, W) {0, 1}
                        "label": torch.tensor(1, dtype=torch.int64),
                        "image_path": f"{item['image_path']}#{SYNTHETIC_PREFIX}{family}_{k}",
                        "defect_type": SYNTHETIC_PREFIX + family,
                        "synthetic": torch.tensor(True),
                    }
                )
                self.items[-1]["image"] = self.items[-1]["image"].permute(2, 0, 1).contiguous()
        self.n_normal = len(items)
        self.n_synthetic = len(self.items) - self.n_normal
        real = real if real is not None else []
        self.items += [{**real[i], "synthetic": torch.tensor(False)} for i in range(len(real))]
        self.n_real = len(real)
        # the real files behind the set
        self.samples = [*getattr(normal, "samples", []), *getattr(real, "samples", [])]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]
