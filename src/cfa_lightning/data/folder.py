"""Users' own folders: normal images, optional abnormal folders, masks matched by file stem.

Layout (all folders relative to ``root``; only ``normal_dir`` is required)::

    <root>/<normal_dir>/*              normal images: train (+ val, + normal test part)
    <root>/<abnormal_dirs[i]>/*        abnormal test images, defect type = folder name
    <root>/<mask_dir>/<stem>[_mask].*  masks of the abnormal images (0 = normal, 255 = defect)
    <root>/<normal_test_dir>/*         normal test images (else ``test_fraction`` of normal_dir)
    <root>/<val_dir>/*                 validation images (else ``val_fraction`` of normal_dir);
                                       flat = normal, or good/ + <defect>/ subfolders

Any extension PIL can open is accepted. Without masks the test reports image metrics only;
without abnormal images it scores the normal ones and says AUROC cannot be computed.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image
from pytorch_lightning.utilities import rank_zero_warn

from .base import AnomalyDataModule, split_train_val
from .layout import GOOD, Sample, list_subfolders

__all__ = ["FolderDataModule", "check_disjoint", "pil_extensions", "scan_folder"]


def pil_extensions() -> tuple[str, ...]:
    """File extensions (lower case, with the dot) of every format PIL can open."""
    Image.init()
    return tuple(
        sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)
    )


def _as_list(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    return [os.fspath(v) for v in value]


def _folder(root: Path, name: str, option: str) -> Path:
    """``root / name`` as an existing folder, or an error with the closest names under root."""
    path = Path(os.path.expanduser(name))
    path = path if path.is_absolute() else root / path
    if path.is_dir():
        return path
    parent = path.parent
    present = [p.name for p in list_subfolders(parent)] if parent.is_dir() else []
    close = difflib.get_close_matches(path.name, present, n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    where = (
        f"folders in {parent}: {', '.join(present) or '(none)'}"
        if parent.is_dir()
        else f"{parent} does not exist either (data.root={root})"
    )
    raise FileNotFoundError(f"{option}: no folder {path}.{hint} ({where})")


def _images(folder: Path, option: str, required: bool = True) -> list[Path]:
    """Image files in ``folder`` (PIL-readable extensions); other files are reported, not hidden."""
    extensions = pil_extensions()
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in extensions]
    others = [p for p in files if p.suffix.lower() not in extensions]
    if others:
        rank_zero_warn(
            f"{option}: ignored {len(others)} file(s) in {folder} that are not images by "
            f"extension (e.g. {others[0].name})"
        )
    if required and not images:
        raise FileNotFoundError(
            f"{option}: folder {folder} holds no images (any format PIL reads, e.g. .png, .jpg, "
            ".bmp, .tif); put the images there or point the option at another folder."
        )
    return images


def _mask_index(mask_dirs: list[Path]) -> dict[str, Path]:
    """Masks by stem: ``a.png`` and ``a_mask.png`` both match image ``a.*``."""
    index: dict[str, Path] = {}
    for folder in mask_dirs:
        for mask in _images(folder, "data.mask_dir", required=False):
            stem = mask.stem[: -len("_mask")] if mask.stem.endswith("_mask") else mask.stem
            if stem in index:
                raise ValueError(
                    f"data.mask_dir: two masks for the stem {stem!r}: {index[stem]} and {mask}; "
                    "keep one of them."
                )
            index[stem] = mask
    return index


def scan_folder(
    root: str | os.PathLike,
    normal_dir: str,
    abnormal_dirs: str | Sequence[str] | None = None,
    mask_dir: str | Sequence[str] | None = None,
    normal_test_dir: str | None = None,
    val_dir: str | None = None,
) -> dict[str, list[Sample]]:
    """``{"normal", "abnormal", "normal_test", "val"}`` samples of a user's folders."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"data.root: folder {root} does not exist; set data.root to the folder that holds "
            "your image folders (data.normal_dir and the others are relative to it)."
        )
    normal = [
        Sample(p, 0, None, GOOD)
        for p in _images(_folder(root, normal_dir, "data.normal_dir"), "data.normal_dir")
    ]

    abnormal_folders = [_folder(root, d, "data.abnormal_dirs") for d in _as_list(abnormal_dirs)]
    mask_folders = [_folder(root, d, "data.mask_dir") for d in _as_list(mask_dir)]
    masks = _mask_index(mask_folders) if mask_folders else {}
    abnormal: list[Sample] = []
    missing: list[Path] = []
    for folder in abnormal_folders:
        for image in _images(folder, "data.abnormal_dirs", required=False):
            mask = masks.pop(image.stem, None)
            if mask_folders and mask is None:
                missing.append(image)
            abnormal.append(Sample(image, 1, mask, folder.name))
    if missing:
        shown = ", ".join(str(p) for p in missing[:5])
        raise FileNotFoundError(
            f"{len(missing)} abnormal image(s) have no mask in {', '.join(map(str, mask_folders))} "
            f"(matched by file stem: <stem>.png or <stem>_mask.png): {shown}"
            f"{' ...' if len(missing) > 5 else ''}. Add the masks, or set data.mask_dir=null "
            "to evaluate image metrics only."
        )
    if masks:
        orphans = sorted(masks.values())
        rank_zero_warn(
            f"{len(orphans)} mask(s) match no abnormal image by stem and are ignored: "
            f"{', '.join(str(p) for p in orphans[:3])}{' ...' if len(orphans) > 3 else ''}"
        )

    normal_test: list[Sample] = []
    if normal_test_dir is not None:
        folder = _folder(root, normal_test_dir, "data.normal_test_dir")
        normal_test = [Sample(p, 0, None, GOOD) for p in _images(folder, "data.normal_test_dir")]

    val: list[Sample] = []
    if val_dir is not None:
        folder = _folder(root, val_dir, "data.val_dir")
        subfolders = list_subfolders(folder)
        if subfolders:  # good/ + <defect>/ subfolders (no masks: validation is image-level)
            for sub in subfolders:
                label = 0 if sub.name == GOOD else 1
                val += [
                    Sample(p, label, None, sub.name)
                    for p in _images(sub, "data.val_dir", required=False)
                ]
            if not val:
                raise FileNotFoundError(f"data.val_dir: no images in the subfolders of {folder}")
        else:
            val = [Sample(p, 0, None, GOOD) for p in _images(folder, "data.val_dir")]
    return {"normal": normal, "abnormal": abnormal, "normal_test": normal_test, "val": val}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_disjoint(val: list[Sample], test: list[Sample]) -> None:
    """Stop when a data.val_dir image is also a test image: the same file, or the same bytes."""
    test_files = {Path(s.path).resolve(): s for s in test}
    by_size: dict[int, list[Path]] = {}
    for path in test_files:
        by_size.setdefault(path.stat().st_size, []).append(path)
    for sample in val:
        path = Path(sample.path).resolve()
        same = path if path in test_files else None
        if same is None:
            candidates = by_size.get(path.stat().st_size, [])
            if candidates:
                digest = _digest(path)
                same = next((t for t in candidates if _digest(t) == digest), None)
        if same is not None:
            raise ValueError(
                f"data.val_dir: {sample.path} is also a test image ({same}): validation would "
                "select on the test set. Remove it from data.val_dir, or point data.val_dir at "
                "images that are not in data.abnormal_dirs / data.normal_test_dir."
            )


class FolderDataModule(AnomalyDataModule):
    """Train on a folder of normal images; test on held-out normal and optional abnormal ones."""

    def __init__(
        self,
        root: str,
        normal_dir: str,
        abnormal_dirs: str | Sequence[str] | None = None,
        mask_dir: str | Sequence[str] | None = None,
        normal_test_dir: str | None = None,
        val_dir: str | None = None,
        test_fraction: float = 0.2,
        category: str = "folder",
        **kwargs,
    ) -> None:
        kwargs.pop("download", None)  # nothing to download for one's own images
        super().__init__(root=root, category=category, **kwargs)
        if not 0.0 <= float(test_fraction) < 1.0:
            raise ValueError(f"data.test_fraction must be in [0, 1), got {test_fraction}")
        self.folders = dict(
            normal_dir=normal_dir,
            abnormal_dirs=abnormal_dirs,
            mask_dir=mask_dir,
            normal_test_dir=normal_test_dir,
            val_dir=val_dir,
        )
        self.test_fraction = float(test_fraction)

    def prepare_data(self) -> None:
        """Nothing to fetch; the folders are checked in :meth:`setup`."""

    def scan(self) -> tuple[list[Sample], list[Sample], list[Sample]]:
        found = scan_folder(self.root, **self.folders)
        normal = found["normal"]
        normal_test = found["normal_test"]
        if not normal_test and self.test_fraction > 0:
            # Seeded hold-out of normal images for the test set (never seen in training).
            keep, held = split_train_val(len(normal), self.test_fraction, self.split_seed + 1)
            normal, normal_test = [normal[i] for i in keep], [normal[i] for i in held]
        val = found["val"]
        if val:
            check_disjoint(val, normal_test + found["abnormal"])
            if not any(s.label == 0 for s in val):
                synthetic = self.val_anomalies == "synthetic"
                need = self.synthetic_config.min_images if synthetic else 1
                why = (
                    " (data.synthetic_anomalies.min_images: the synthetic defects are drawn on "
                    "them)"
                    if synthetic
                    else ""
                )
                raise ValueError(
                    f"data.val_dir={self.folders['val_dir']} holds {len(val)} defective "
                    "image(s) and no normal one, but the thresholds are calibrated on normal "
                    f"validation images: put at least {need} normal image(s){why} in a good/ "
                    "subfolder of data.val_dir, beside the defect folders."
                )
        else:
            train_idx, val_idx = split_train_val(len(normal), self.val_fraction, self.split_seed)
            normal, val = [normal[i] for i in train_idx], [normal[i] for i in val_idx]
        test = normal_test + found["abnormal"]
        if not test:
            raise FileNotFoundError(
                "the test set is empty: set data.abnormal_dirs, data.normal_test_dir or "
                "data.test_fraction > 0"
            )
        if not found["abnormal"]:
            rank_zero_warn(
                f"no abnormal images (data.abnormal_dirs is empty): the test scores "
                f"{len(test)} normal image(s) only; image AUROC and F1 cannot be computed."
            )
        elif not normal_test:
            rank_zero_warn(
                "no normal test images (data.normal_test_dir unset and data.test_fraction=0): "
                "image AUROC cannot be computed."
            )
        return normal, val, test

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={self.root}, {self.folders})"
