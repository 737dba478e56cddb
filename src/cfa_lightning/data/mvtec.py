"""MVTec AD layout: folder scan, dataset and LightningDataModule.

Layout (one category)::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png            label 0
    <root>/<category>/test/<defect>/*.png        label 1
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png

The validation split is a seeded random part of ``train/good``; it never
touches ``test`` (see the evaluation protocol in ``cfa_spec.md``).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import to_absolute_path
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from .download import ensure_archive_extracted
from .transforms import ImageMaskTransform, load_mask, load_rgb

__all__ = [
    "IMAGE_EXTENSIONS",
    "MIN_IMAGE_SIDE",
    "MVTEC_CATEGORIES",
    "MVTEC_COUNTS",
    "MVTEC_URL",
    "CategoryCounts",
    "MVTecDataModule",
    "MVTecDataset",
    "Sample",
    "check_category_dir",
    "count_samples",
    "list_images",
    "scan_mvtec_category",
    "verify_samples",
]

MVTEC_CATEGORIES: tuple[str, ...] = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MVTEC_URL = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
GOOD = "good"
# Smallest image side (pixels) accepted: below it an image carries too little detail to be
# resized to data.image_size meaningfully (a 16 px image would be upscaled 16x to 256).
MIN_IMAGE_SIDE = 32


class CategoryCounts(NamedTuple):
    """Images of one MVTec AD category: train/good, test/good, test/<defects>, defect types."""

    train: int
    test_good: int
    test_defect: int
    defect_types: int
    grayscale: bool = False


# Source: Bergmann, Fauser, Sattlegger, Steger, "MVTec AD - A Comprehensive Real-World Dataset
# for Unsupervised Anomaly Detection", CVPR 2019, Table 1 (5354 images: 3629 train, 467 good
# and 1258 defective test images, 73 defect types). Grayscale categories: grid, screw, zipper.
MVTEC_COUNTS: dict[str, CategoryCounts] = {
    "bottle": CategoryCounts(209, 20, 63, 3),
    "cable": CategoryCounts(224, 58, 92, 8),
    "capsule": CategoryCounts(219, 23, 109, 5),
    "carpet": CategoryCounts(280, 28, 89, 5),
    "grid": CategoryCounts(264, 21, 57, 5, grayscale=True),
    "hazelnut": CategoryCounts(391, 40, 70, 4),
    "leather": CategoryCounts(245, 32, 92, 5),
    "metal_nut": CategoryCounts(220, 22, 93, 4),
    "pill": CategoryCounts(267, 26, 141, 7),
    "screw": CategoryCounts(320, 41, 119, 5, grayscale=True),
    "tile": CategoryCounts(230, 33, 84, 5),
    "toothbrush": CategoryCounts(60, 12, 30, 1),
    "transistor": CategoryCounts(213, 60, 40, 4),
    "wood": CategoryCounts(247, 19, 60, 5),
    "zipper": CategoryCounts(240, 32, 119, 7, grayscale=True),
}


class Sample(NamedTuple):
    """One image: its path, label (0 normal, 1 anomalous), mask path and defect folder."""

    path: Path
    label: int
    mask_path: Path | None
    defect_type: str


# ---------------------------------------------------------------------------- scanning


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (case-insensitive extension, no hidden files), sorted."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_category_dir(root: str | os.PathLike, category: str) -> Path:
    """Return ``<root>/<category>``; raise a helpful ``FileNotFoundError`` if absent."""
    root = Path(root)
    get_it = (
        f"MVTec AD can be downloaded from {MVTEC_URL} and extracted into {root}, "
        "or set data.root=<folder that holds the category folders>."
    )
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist (data.root). {get_it}")
    category_dir = root / category
    if category_dir.is_dir():
        return category_dir

    present = [p.name for p in _subfolders(root)]
    candidates = list(dict.fromkeys([*present, *MVTEC_CATEGORIES]))
    close = difflib.get_close_matches(category, candidates, n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    found = ", ".join(present) if present else "(none)"
    raise FileNotFoundError(
        f"category '{category}' not found under {root} (no folder {category_dir}; "
        f"data.category).{hint} Folders under the root: {found}. "
        f"Known MVTec AD categories: {', '.join(MVTEC_CATEGORIES)}. {get_it}"
    )


def _mask_path_for(gt_dir: Path, image: Path) -> Path | None:
    """``<gt_dir>/<stem>_mask.png``, or the same stem with another image extension."""
    preferred = gt_dir / f"{image.stem}_mask.png"
    if preferred.is_file():
        return preferred
    if gt_dir.is_dir():
        for ext in IMAGE_EXTENSIONS:
            for candidate in (ext, ext.upper()):
                path = gt_dir / f"{image.stem}_mask{candidate}"
                if path.is_file():
                    return path
    return None


def scan_mvtec_category(root: str | os.PathLike, category: str) -> dict[str, list[Sample]]:
    """List a category's samples: ``{"train": [...], "test": [...]}``, sorted by folder, name.

    Only paths are checked here; images are opened lazily by :class:`MVTecDataset`.
    """
    category_dir = check_category_dir(root, category)

    train_dir = category_dir / "train" / GOOD
    if not train_dir.is_dir():
        raise FileNotFoundError(
            f"no training folder {train_dir}: the MVTec AD layout expects normal training "
            f"images in <root>/{category}/train/good/. Check data.root and data.category."
        )
    train_images = list_images(train_dir)
    if not train_images:
        raise FileNotFoundError(
            f"training folder {train_dir} holds no images (extensions: "
            f"{', '.join(IMAGE_EXTENSIONS)}); put the normal training images there."
        )
    train = [Sample(p, 0, None, GOOD) for p in train_images]

    test_dir = category_dir / "test"
    test: list[Sample] = []
    if test_dir.is_dir():
        for defect_dir in _subfolders(test_dir):
            defect = defect_dir.name
            gt_dir = category_dir / "ground_truth" / defect
            for image in list_images(defect_dir):
                if defect == GOOD:
                    test.append(Sample(image, 0, None, GOOD))
                    continue
                mask = _mask_path_for(gt_dir, image)
                if mask is None:
                    raise FileNotFoundError(
                        f"defect image {image} has no ground-truth mask; expected "
                        f"{gt_dir / (image.stem + '_mask.png')} (0/255, same size as the "
                        "image). Add the mask or move the image out of the test folder."
                    )
                test.append(Sample(image, 1, mask, defect))
    if not test:
        raise FileNotFoundError(
            f"test folder {test_dir} holds no images: the MVTec AD layout expects "
            f"<root>/{category}/test/good/*.png and test/<defect>/*.png with masks in "
            f"ground_truth/<defect>/<stem>_mask.png."
        )
    _warn_orphan_masks(category_dir / "ground_truth", {s.mask_path for s in test})
    scanned = [train_dir, *(_subfolders(test_dir) if test_dir.is_dir() else [])]
    _warn_non_images(scanned)
    return {"train": train, "test": test}


def _warn_non_images(folders: Sequence[Path]) -> None:
    """Files that are not images by extension are ignored, and said so."""
    others = [
        p
        for folder in folders
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in IMAGE_EXTENSIONS
    ]
    if others:
        rank_zero_warn(
            f"ignored {len(others)} file(s) that are not images by extension "
            f"({', '.join(IMAGE_EXTENSIONS)}), e.g. {others[0]}"
        )


def _warn_orphan_masks(gt_root: Path, used: set[Path | None]) -> None:
    """Masks that belong to no test image are ignored, but never silently."""
    if not gt_root.is_dir():
        return
    orphans = [m for d in _subfolders(gt_root) for m in list_images(d) if m not in used]
    if orphans:
        shown = ", ".join(str(m) for m in orphans[:3])
        rank_zero_warn(
            f"{len(orphans)} mask(s) under {gt_root} have no test image with the same stem and "
            f"are ignored: {shown}{' ...' if len(orphans) > 3 else ''}"
        )


def count_samples(samples: Mapping[str, Sequence[Sample]]) -> CategoryCounts:
    """Counts of a scanned category, comparable with :data:`MVTEC_COUNTS`."""
    test = samples["test"]
    defects = {s.defect_type for s in test if s.label == 1}
    n_good = sum(s.label == 0 for s in test)
    return CategoryCounts(len(samples["train"]), n_good, len(test) - n_good, len(defects))


def _check_known_counts(category_dir: Path, samples: Mapping[str, Sequence[Sample]]) -> None:
    expected = MVTEC_COUNTS.get(category_dir.name)
    if expected is None:
        return
    found = count_samples(samples)
    if found != expected._replace(grayscale=False):
        rank_zero_warn(
            f"{category_dir} holds {found.train} train, {found.test_good} good test and "
            f"{found.test_defect} defective test images in {found.defect_types} defect types; "
            f"the complete MVTec AD '{category_dir.name}' has {expected.train}, "
            f"{expected.test_good}, {expected.test_defect} in {expected.defect_types}. An "
            "incomplete copy gives numbers that are not comparable with published ones."
        )


# ---------------------------------------------------------------------------- verification


class _Problem(NamedTuple):
    path: Path
    reason: str


def _inspect(sample: Sample, min_side: int) -> tuple[_Problem | None, bool]:
    """Decode a sample's image (and mask); return (problem or None, mask has other values)."""
    try:
        image = load_rgb(sample.path)
    except (OSError, ValueError) as err:
        return _Problem(sample.path, f"unreadable ({err.__class__.__name__})"), False
    if min(image.size) < min_side:
        w, h = image.size
        return _Problem(sample.path, f"{w}x{h} px, smaller than {min_side} px"), False
    if sample.mask_path is None:
        return None, False
    try:
        mask = load_mask(sample.mask_path)
    except (OSError, ValueError) as err:
        return _Problem(sample.mask_path, f"unreadable mask ({err.__class__.__name__})"), False
    if mask.size != image.size:
        return _Problem(
            sample.mask_path,
            f"mask is {mask.size[0]}x{mask.size[1]} but its image {sample.path.name} is "
            f"{image.size[0]}x{image.size[1]} (WxH)",
        ), False
    values = np.unique(np.asarray(mask))
    return None, bool(np.isin(values, (0, 255), invert=True).any())


def verify_samples(
    samples: Sequence[Sample],
    *,
    skip_bad: bool = False,
    min_side: int = MIN_IMAGE_SIDE,
    workers: int | None = None,
) -> list[Sample]:
    """Decode every image and mask once, before training, so no bad file surfaces mid-run.

    A file that cannot be decoded, an image with a side below ``min_side`` or a mask whose size
    differs from its image stops the run with the list of files, or with ``skip_bad`` is left
    out with one warning that counts them. Masks with values other than 0/255 are binarised
    at > 127, with one warning.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes without the GIL
        results = list(pool.map(lambda s: _inspect(s, min_side), samples))
    problems = [p for p, _ in results if p is not None]
    soft_masks = [s.mask_path for s, (_, soft) in zip(samples, results, strict=True) if soft]
    if soft_masks:
        rank_zero_warn(
            f"{len(soft_masks)} mask(s) hold values other than 0 and 255 (e.g. {soft_masks[0]}); "
            "they are binarised: a pixel is a defect when its value is > 127."
        )
    if not problems:
        return list(samples)
    listed = "; ".join(f"{p.path} ({p.reason})" for p in problems[:5])
    more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
    if not skip_bad:
        raise ValueError(
            f"{len(problems)} bad image or mask file(s): {listed}{more}. Fix or remove them, "
            "or set data.skip_bad_images=true to leave them out."
        )
    rank_zero_warn(
        f"data.skip_bad_images: skipped {len(problems)} of {len(samples)} image(s): {listed}{more}"
    )
    bad = {p.path for p in problems}
    return [s for s in samples if s.path not in bad and s.mask_path not in bad]


# ---------------------------------------------------------------------------- dataset


class MVTecDataset(Dataset):
    """Samples -> dicts with ``image`` (3, H, W), ``mask`` (1, H, W), ``label``, path, defect.

    ``cache=True`` keeps each decoded, resized image and mask in memory after its first use
    (about 0.8 MB per image at 256 px): later epochs skip decoding. Each worker process holds
    its own cache, so use it with ``num_workers=0`` or persistent workers.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: ImageMaskTransform | None = None,
        cache: bool = False,
    ):
        self.samples = [Sample(*s) for s in samples]
        self.transform = transform or ImageMaskTransform()
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        path, label, mask_path, defect_type = self.samples[index]
        if self._cache is not None and index in self._cache:
            x, m = self._cache[index]
        else:
            x, m = self._load(path, mask_path)
            if self._cache is not None:
                self._cache[index] = (x, m)
        return {
            "image": x,
            "mask": m,
            "label": torch.tensor(int(label), dtype=torch.int64),
            "image_path": str(path),
            "defect_type": defect_type,
        }

    def _load(self, path: Path, mask_path: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
        image = load_rgb(path)
        mask = None
        if mask_path is not None:
            mask = load_mask(mask_path)
            if mask.size != image.size:
                raise ValueError(
                    f"mask {mask_path} is {mask.size[0]}x{mask.size[1]} (WxH) but its image "
                    f"{path} is {image.size[0]}x{image.size[1]}; masks must match their image "
                    "pixel for pixel. Fix or regenerate the mask."
                )
        return self.transform(image, mask)  # (3, H, W) float [0, 1], (1, H, W) float {0, 1}


# ---------------------------------------------------------------------------- datamodule


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


class MVTecDataModule(pl.LightningDataModule):
    """One MVTec-layout category: train (+ seeded val from train/good), bank and test loaders.

    ``download`` (a mapping, see ``conf/data/mvtec.yaml``) fetches MVTec AD when a known
    category is missing; ``verify_images`` decodes every file once in ``setup`` so a bad file
    stops the run before training (or, with ``skip_bad_images``, is left out and counted).
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
        download: Mapping[str, Any] | None = None,
        verify_images: bool = True,
        skip_bad_images: bool = False,
        cache_images: bool = False,
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
        self.root = _resolve_root(root)
        self.category = category
        self.transform = ImageMaskTransform(image_size, crop_size)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.val_fraction = float(val_fraction)
        self.split_seed = int(split_seed)
        self.pin_memory = bool(pin_memory)
        self.download = dict(download or {})
        self.verify_images = bool(verify_images)
        self.skip_bad_images = bool(skip_bad_images)
        self.cache_images = bool(cache_images)
        self.train_set: MVTecDataset | None = None
        self.val_set: MVTecDataset | None = None
        self.test_set: MVTecDataset | None = None

    @property
    def has_masks(self) -> bool:
        """Whether the test set has ground-truth masks (else pixel metrics are skipped)."""
        return self.test_set is not None and any(
            s.mask_path is not None for s in self.test_set.samples
        )

    def manual_download_hint(self) -> str:
        archive = self.download.get("archive_name", "mvtec_anomaly_detection.tar.xz")
        return (
            f"To get MVTec AD by hand: download {archive} from {MVTEC_URL} (or "
            f"{self.download.get('url', MVTEC_URL)}) on a machine with internet, then either "
            f"put the archive at {self.root / archive} (the next run verifies and extracts "
            f"it) or extract it anywhere and set data.root=<folder holding bottle/, cable/, "
            "...>. data.download.enabled=false turns the download off."
        )

    def prepare_data(self) -> None:
        """Download MVTec AD if a known category is missing (local rank 0, under a file lock)."""
        if (
            not (self.root / self.category).is_dir()
            and self.download.get("enabled", False)
            and self.category in MVTEC_CATEGORIES
        ):
            ensure_archive_extracted(
                self.root,
                self.category,
                url=self.download.get("url") or "",
                sha256=self.download.get("sha256"),
                archive_name=self.download.get("archive_name", "mvtec_anomaly_detection.tar.xz"),
                keep_archive=bool(self.download.get("keep_archive", False)),
                timeout_s=float(self.download.get("timeout_s", 10)),
                retries=int(self.download.get("retries", 3)),
                backoff_s=float(self.download.get("backoff_s", 2)),
                manual_hint=self.manual_download_hint(),
            )
        check_category_dir(self.root, self.category)

    def scan(self) -> tuple[list[Sample], list[Sample], list[Sample]]:
        """(train, val, test) samples: val is a seeded part of train/good, never of test."""
        samples = scan_mvtec_category(self.root, self.category)
        _check_known_counts(self.root / self.category, samples)
        train = samples["train"]
        train_idx, val_idx = split_train_val(len(train), self.val_fraction, self.split_seed)
        if self.val_fraction > 0 and not val_idx:
            rank_zero_warn(
                f"only {len(train)} training image(s) in {self.root / self.category}; "
                "no validation split (all stay in training)."
            )
        return [train[i] for i in train_idx], [train[i] for i in val_idx], samples["test"]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:  # scan once, whatever the stage
            return
        train, val, test = self.scan()
        if self.verify_images:
            kept = set(verify_samples([*train, *val, *test], skip_bad=self.skip_bad_images))
            train, val, test = ([s for s in part if s in kept] for part in (train, val, test))
            if not train:
                raise ValueError("no readable training image is left after skipping bad files")
            if not test:
                raise ValueError("no readable test image is left after skipping bad files")
        cache = self.cache_images
        self.train_set = MVTecDataset(train, self.transform, cache)
        self.val_set = MVTecDataset(val, self.transform, cache) if val else None
        self.test_set = MVTecDataset(test, self.transform, cache)

    def _loader(self, dataset: MVTecDataset | None, batch_size: int, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("MVTecDataModule.setup() must run before asking for dataloaders")
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def bank_dataloader(self) -> DataLoader:
        """The training images in a fixed order, for building the memory bank."""
        return self._loader(self.train_set, self.eval_batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader | list:
        """Normal images held out from train/good; ``[]`` when ``val_fraction == 0``."""
        if self.train_set is not None and self.val_set is None:
            return []
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)
