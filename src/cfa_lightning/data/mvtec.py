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
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from .transforms import ImageMaskTransform, load_mask, load_rgb

__all__ = [
    "IMAGE_EXTENSIONS",
    "MVTEC_CATEGORIES",
    "MVTEC_URL",
    "MVTecDataModule",
    "MVTecDataset",
    "Sample",
    "check_category_dir",
    "list_images",
    "scan_mvtec_category",
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
    return {"train": train, "test": test}


# ---------------------------------------------------------------------------- dataset


class MVTecDataset(Dataset):
    """Samples -> dicts with ``image`` (3, H, W), ``mask`` (1, H, W), ``label``, path, defect."""

    def __init__(self, samples: Sequence[Sample], transform: ImageMaskTransform | None = None):
        self.samples = [Sample(*s) for s in samples]
        self.transform = transform or ImageMaskTransform()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        path, label, mask_path, defect_type = self.samples[index]
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
        x, m = self.transform(image, mask)  # (3, H, W) float [0, 1], (1, H, W) float {0, 1}
        return {
            "image": x,
            "mask": m,
            "label": torch.tensor(int(label), dtype=torch.int64),
            "image_path": str(path),
            "defect_type": defect_type,
        }


# ---------------------------------------------------------------------------- datamodule


def _resolve_root(root: str | os.PathLike) -> Path:
    """Absolute root; relative paths are taken from the launch directory under Hydra."""
    root = os.path.expanduser(os.fspath(root))
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.utils import to_absolute_path

        if HydraConfig.initialized():
            return Path(to_absolute_path(root))
    except ImportError:  # pragma: no cover - hydra is a dependency, but keep data usable alone
        pass
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
    """One MVTec-layout category: train (+ seeded val from train/good), bank and test loaders."""

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
        self.train_set: MVTecDataset | None = None
        self.val_set: MVTecDataset | None = None
        self.test_set: MVTecDataset | None = None

    def prepare_data(self) -> None:
        """Check that the category is present (the seam for a future download step)."""
        check_category_dir(self.root, self.category)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:  # scan once, whatever the stage
            return
        samples = scan_mvtec_category(self.root, self.category)
        train = samples["train"]
        train_idx, val_idx = split_train_val(len(train), self.val_fraction, self.split_seed)
        if self.val_fraction > 0 and not val_idx:
            rank_zero_warn(
                f"only {len(train)} training image(s) in {self.root / self.category}; "
                "no validation split (all stay in training)."
            )
        self.train_set = MVTecDataset([train[i] for i in train_idx], self.transform)
        self.val_set = (
            MVTecDataset([train[i] for i in val_idx], self.transform) if val_idx else None
        )
        self.test_set = MVTecDataset(samples["test"], self.transform)

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
