"""MVTec AD layout: the folder scan, known categories and their image counts.

Layout (one category)::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png            label 0
    <root>/<category>/test/<defect>/*.png        label 1
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png

Only paths are checked here; files are decoded by ``verify.py`` and ``dataset.py``.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from pytorch_lightning.utilities import rank_zero_warn

from ..images import IMAGE_EXTENSIONS

__all__ = [
    "GOOD",
    "MVTEC_CATEGORIES",
    "MVTEC_COUNTS",
    "MVTEC_URL",
    "CategoryCounts",
    "Sample",
    "check_category_dir",
    "count_samples",
    "list_images",
    "list_subfolders",
    "scan_mvtec_category",
    "warn_if_incomplete",
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
MVTEC_URL = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
GOOD = "good"


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


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (case-insensitive extension, no hidden files), sorted."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def list_subfolders(folder: Path) -> list[Path]:
    """Folders directly in ``folder`` (no hidden ones), sorted."""
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

    present = [p.name for p in list_subfolders(root)]
    candidates = [c for c in dict.fromkeys([*present, *MVTEC_CATEGORIES]) if c != category]
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

    Only paths are checked here; images are opened lazily by :class:`AnomalyDataset` (dataset.py).
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
        for defect_dir in list_subfolders(test_dir):
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
    scanned = [train_dir, *(list_subfolders(test_dir) if test_dir.is_dir() else [])]
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
    orphans = [m for d in list_subfolders(gt_root) for m in list_images(d) if m not in used]
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


def warn_if_incomplete(category_dir: Path, samples: Mapping[str, Sequence[Sample]]) -> None:
    """Warn when a known MVTec AD category holds other counts than :data:`MVTEC_COUNTS`."""
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
