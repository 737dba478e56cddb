"""The DataModule base shared by the MVTec layout and users' own folders.

A subclass says where the samples are (:meth:`AnomalyDataModule.scan`: train, val, test);
this base verifies the files, builds the datasets, the optional synthetic-anomaly validation
split and the loaders. Validation images come from the training images (or a validation
folder), never from the test set (see "Evaluation protocol" in ``docs/method.md``).
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import to_absolute_path
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from ..images import image_hw
from ..sizes import MAX_ASPECT, aspect_rule, auto_input_size, is_auto, square_side
from .dataset import AnomalyDataset
from .layout import Sample
from .transforms import ImageMaskTransform
from .val_anomalies import SyntheticAnomalyConfig, SyntheticValidationSet
from .verify import verify_samples

__all__ = ["VAL_ANOMALIES", "AnomalyDataModule", "smallest_val_fraction", "split_train_val"]

VAL_ANOMALIES = ("none", "synthetic")
log = logging.getLogger("cfa_lightning.data")


def _resolve_root(root: str | os.PathLike) -> Path:
    """Absolute root; relative paths are taken from the launch directory under Hydra."""
    root = os.path.expanduser(os.fspath(root))
    if HydraConfig.initialized():
        return Path(to_absolute_path(root))
    return Path(os.path.abspath(root))


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded random split of ``range(n)`` into sorted (train, val) indices.

    ``round(val_fraction * n)`` images go to val (at least 1 when the fraction is
    positive), always leaving at least one image for training.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * n))
    n_val = min(n_val, n - 1)
    generator = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(n, generator=generator).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


def smallest_val_fraction(n: int, n_val: int) -> float | None:
    """The smallest ``data.val_fraction`` (in steps of 0.01) that holds out ``n_val`` of ``n``."""
    for percent in range(1, 100):
        fraction = percent / 100
        _, val = split_train_val(n, fraction, 0)
        if len(val) >= n_val:
            return fraction
    return None


class AnomalyDataModule(pl.LightningDataModule, abc.ABC):
    """Train, bank, validation and test loaders over the samples :meth:`scan` lists.

    ``val_anomalies="synthetic"`` scores every validation image as it is and with synthetic
    defects (``synthetic_anomalies``: families, per_image, seed, min_images), drawn once in
    ``setup``. ``split_seed`` fixes which training images are held out for validation; it is
    independent of the training seed, so seeds vary the initialisation only.
    """

    def __init__(
        self,
        root: str,
        category: str,
        image_size: int | Sequence[int] = 256,
        crop_size: int | Sequence[int] | None = None,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        pin_memory: bool = False,
        verify_images: bool = True,
        skip_bad_images: bool = False,
        cache_images: bool = False,
        val_anomalies: str = "none",
        synthetic_anomalies: Mapping[str, Any] | None = None,
        pixels: int = 65536,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        if int(batch_size) < 1 or (eval_batch_size is not None and int(eval_batch_size) < 1):
            raise ValueError(
                f"data.batch_size / data.eval_batch_size must be >= 1, got "
                f"{batch_size} / {eval_batch_size}"
            )
        val_anomalies = "none" if val_anomalies in (None, False) else str(val_anomalies)
        if val_anomalies not in VAL_ANOMALIES:
            raise ValueError(
                f"data.val_anomalies={val_anomalies!r}; choose one of {', '.join(VAL_ANOMALIES)}"
            )
        self.root = _resolve_root(root)
        self.category = category
        self.pixels = pixels
        self.auto_size: dict[str, Any] | None = None  # how data.image_size=auto was chosen
        self.transform: ImageMaskTransform | None = None  # auto: set by choose_image_size
        if not is_auto(image_size):
            self.transform = ImageMaskTransform(image_size, crop_size)
        elif crop_size is not None:  # a crop keeps a square resize: the side of the budget
            self._set_image_size((square_side(pixels),) * 2)
        self._samples: tuple[list[Sample], list[Sample], list[Sample]] | None = None
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.val_fraction = float(val_fraction)
        self.split_seed = int(split_seed)
        self.pin_memory = bool(pin_memory)
        self.verify_images = bool(verify_images)
        self.skip_bad_images = bool(skip_bad_images)
        self.cache_images = bool(cache_images)
        self.val_anomalies = val_anomalies
        self.synthetic_config = SyntheticAnomalyConfig.from_mapping(synthetic_anomalies)
        self.train_set: AnomalyDataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: AnomalyDataset | None = None

    @abc.abstractmethod
    def scan(self) -> tuple[list[Sample], list[Sample], list[Sample]]:
        """(train, val, test) samples; val never holds a test image."""

    @property
    def has_masks(self) -> bool:
        """Whether the test set has ground-truth masks (else pixel metrics are skipped)."""
        return self.test_set is not None and any(
            s.mask_path is not None for s in self.test_set.samples
        )

    def _verified_samples(self) -> tuple[list[Sample], list[Sample], list[Sample]]:
        """(train, val, test) samples with unreadable files handled; scanned once."""
        if self._samples is not None:
            return self._samples
        train, val, test = self.scan()
        if self.verify_images:
            kept = set(verify_samples([*train, *val, *test], skip_bad=self.skip_bad_images))
            train, val, test = ([s for s in part if s in kept] for part in (train, val, test))
            if not train:
                raise ValueError("no readable training image is left after skipping bad files")
            if not test:
                raise ValueError("no readable test image is left after skipping bad files")
        self._samples = (train, val, test)
        return self._samples

    def _set_image_size(self, size: tuple[int, int]) -> None:
        """Resize to ``size`` (H, W); the checkpoint's data hyper-parameters record it."""
        self.transform = ImageMaskTransform(list(size), self.hparams.crop_size)
        self.hparams["image_size"] = list(size)

    def choose_image_size(
        self, stride: int, backbone: str = "the backbone", side: int | None = None
    ) -> tuple[int, int]:
        """``data.image_size=auto``: (H, W) of about ``data.pixels`` pixels, each side a multiple
        of ``stride`` (the largest tap stride) and at least ``side`` (`sizes.smallest_side`),
        shaped like the training images when their aspects agree and square when they vary
        (`sizes.aspect_rule`)."""
        if self.transform is not None:
            return self.transform.image_size
        train, _, _ = self._verified_samples()
        rule = aspect_rule([image_hw(s.path) for s in train])  # (H, W) after EXIF orientation
        size = auto_input_size(rule["aspect"], self.pixels, stride, side)
        self._set_image_size(size)
        measured = {k: v for k, v in rule.items() if k != "aspect"}  # the record of aspect_rule
        self.auto_size = {"pixels": self.pixels, "stride": stride, "image_size": list(size)}
        self.auto_size.update(measured)
        self.hparams["auto_size"] = dict(self.auto_size)
        low, high = rule["aspect_range"]
        why = (
            f"their aspects agree ({rule['quantile']:.0%} within {rule['tolerance']:g}x of the "
            f"median H/W {rule['median_aspect']:.3g}): the input keeps that aspect"
            if rule["rule"] == "kept aspect"
            else f"their aspects vary (H/W {low:.3g} to {high:.3g}; {rule['quantile']:.0%} of them "
            f"within {rule['spread']:.3g}x of the median, beyond {rule['tolerance']:g}x): the "
            "input is square"
        )
        h, w = size
        chosen = (
            f"model input {h}x{w} (H x W, data.pixels={self.pixels}, sides multiples of {stride}, "
            f"the largest tap stride of {backbone})"
        )
        log.info("data.image_size=auto: %d training images, %s; %s", len(train), why, chosen)
        aspect = max(rule["aspect"], 1.0 / rule["aspect"])
        if aspect > MAX_ASPECT:
            log.warning(
                "the training images have an aspect ratio of %.1f:1, beyond %g:1: the model input "
                "%dx%d leaves the short side few pixels. Set the size yourself with "
                "data.image_size=[H, W], or cut the images into tiles of a moderate aspect and "
                "train on those.",
                aspect,
                MAX_ASPECT,
                h,
                w,
            )
        return size

    def _adopt_model_size(self) -> None:
        """``auto`` not chosen before setup: take the input size of the model being run."""
        module = getattr(self.trainer, "lightning_module", None) if self.trainer else None
        size = getattr(getattr(module, "model", None), "input_size", None)
        if size is None:
            raise ValueError(
                "data.image_size=auto is chosen from the training images before the model is "
                "built (cfa_lightning.train does it); call choose_image_size(stride) before "
                "setup, or give data.image_size as an int or [H, W]"
            )
        self._set_image_size(tuple(size))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:  # scan once, whatever the stage
            return
        train, val, test = self._verified_samples()
        if self.transform is None:
            self._adopt_model_size()
        cache = self.cache_images
        self.train_set = AnomalyDataset(train, self.transform, cache)
        self.val_set = AnomalyDataset(val, self.transform, cache) if val else None
        self.test_set = AnomalyDataset(test, self.transform, cache)
        if self.val_anomalies == "synthetic":
            self.val_set = self._synthetic_val_set(val)
        if val:
            synthetic = getattr(self.val_set, "n_synthetic", 0)
            real = sum(s.label != 0 for s in val)
            rank_zero_info(
                f"validation: {len(val) - real} normal images, {synthetic} with synthetic "
                f"defects, {real} real anomalies"
            )

    def _synthetic_val_set(self, val: list[Sample]) -> SyntheticValidationSet:
        """The normal validation images with their synthetic defects, and the split's real
        anomalies beside them."""
        normal = [s for s in val if s.label == 0]
        real = [s for s in val if s.label != 0]
        need = self.synthetic_config.min_images
        val_dir = getattr(self, "folders", {}).get("val_dir")
        if len(normal) < need and val_dir:
            raise ValueError(
                f"data.val_anomalies=synthetic needs at least {need} normal validation images "
                f"(data.synthetic_anomalies.min_images), but data.val_dir={val_dir} holds "
                f"{len(normal)}: put at least {need} normal images in it (flat, or in a good/ "
                "subfolder beside the defect folders); or validate without synthetic anomalies "
                "and test the last epoch (data.val_anomalies=none +protocol=last_epoch)."
            )
        if len(normal) < need:
            n = len(val) + len(self.train_set)  # the images the split is drawn from
            fraction = smallest_val_fraction(n, need)
            fix = (
                f"set data.val_fraction={fraction} or more (the smallest that holds out "
                f"{need} of these {n} images)"
                if fraction is not None
                else f"{n} training images are too few: synthetic validation needs {need} "
                "held out and at least one left to train on"
            )
            raise ValueError(
                f"data.val_anomalies=synthetic needs at least {need} normal validation images "
                f"(data.synthetic_anomalies.min_images), found {len(normal)} "
                f"(data.val_fraction={self.val_fraction}): {fix}; or give a validation folder "
                "(data=folder data.val_dir=...), or validate without anomalies and test the "
                "last epoch (data.val_anomalies=none +protocol=last_epoch)."
            )
        return SyntheticValidationSet(
            AnomalyDataset(normal, self.transform),
            self.synthetic_config,
            AnomalyDataset(real, self.transform) if real else None,
        )

    def _loader(self, dataset: Dataset | None, batch_size: int, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for loaders")
        in_memory = isinstance(dataset, SyntheticValidationSet)
        workers = 0 if in_memory else self.num_workers  # nothing to decode: no worker processes
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=False,
            num_workers=workers,
            pin_memory=self.pin_memory,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def bank_dataloader(self) -> DataLoader:
        """The training images in a fixed order, for building the memory bank."""
        return self._loader(self.train_set, self.eval_batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader | list:
        """Validation images (never test images); ``[]`` when there are none."""
        if self.train_set is not None and self.val_set is None:
            return []
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)
