"""Data: MVTec-layout and own folders, download, image/mask transforms, synthetic data."""

from typing import TYPE_CHECKING

from .folder import FolderDataModule
from .mvtec import (
    IMAGE_EXTENSIONS,
    MVTEC_CATEGORIES,
    MVTecDataModule,
    MVTecDataset,
    Sample,
    scan_mvtec_category,
)
from .transforms import ImageMaskTransform, load_mask, load_rgb

if TYPE_CHECKING:
    from .synthetic import SyntheticDataModule, generate_synthetic_dataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "MVTEC_CATEGORIES",
    "FolderDataModule",
    "ImageMaskTransform",
    "MVTecDataModule",
    "MVTecDataset",
    "Sample",
    "SyntheticDataModule",
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
