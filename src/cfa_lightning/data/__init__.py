"""Data: MVTec-layout and own folders, download, transforms, synthetic data and defects."""

from typing import TYPE_CHECKING

from ..images import IMAGE_EXTENSIONS, load_mask, load_rgb
from .base import AnomalyDataModule
from .dataset import AnomalyDataset
from .defects import DEFECT_FAMILIES, draw_defect
from .folder import FolderDataModule
from .layout import MVTEC_CATEGORIES, Sample, scan_mvtec_category
from .mvtec import MVTecDataModule
from .transforms import ImageMaskTransform

if TYPE_CHECKING:
    from .synthetic import SyntheticDataModule, generate_synthetic_dataset

__all__ = [
    "DEFECT_FAMILIES",
    "IMAGE_EXTENSIONS",
    "MVTEC_CATEGORIES",
    "AnomalyDataModule",
    "AnomalyDataset",
    "FolderDataModule",
    "ImageMaskTransform",
    "MVTecDataModule",
    "Sample",
    "SyntheticDataModule",
    "draw_defect",
    "generate_synthetic_dataset",
    "load_mask",
    "load_rgb",
    "scan_mvtec_category",
]


def __getattr__(name: str):
    # Imported on first use so `python -m cfa_lightning.data.synthetic` runs the module once.
    if name == "generate_synthetic_dataset":
        from .synthetic import generate_synthetic_dataset

        return generate_synthetic_dataset
    if name == "SyntheticDataModule":
        from .synthetic import SyntheticDataModule

        return SyntheticDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
