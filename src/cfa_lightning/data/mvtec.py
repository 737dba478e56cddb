"""MVTec AD: the DataModule of one category, with the archive download.

The folder scan lives in ``layout.py``, file checks in ``verify.py``, the dataset in
``dataset.py`` and the loaders in ``base.py``.
The validation split is a seeded part of ``train/good`` (``data.split_seed``), never ``test``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pytorch_lightning.utilities import rank_zero_warn

from .base import AnomalyDataModule, split_train_val
from .download import ensure_archive_extracted
from .layout import (
    MVTEC_CATEGORIES,
    MVTEC_URL,
    Sample,
    check_category_dir,
    scan_mvtec_category,
    warn_if_incomplete,
)

__all__ = ["MVTecDataModule"]


class MVTecDataModule(AnomalyDataModule):
    """One MVTec-layout category: train (+ seeded val from train/good), bank and test loaders.

    ``download`` (a mapping, see ``conf/data/mvtec.yaml``) fetches MVTec AD when a known
    category is missing; ``verify_images`` decodes every file once in ``setup`` so a bad file
    stops the run before training (or, with ``skip_bad_images``, is left out and counted).
    """

    def __init__(
        self,
        root: str,
        category: str,
        download: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, category=category, **kwargs)
        self.download = dict(download or {})

    def manual_download_hint(self) -> str:
        archive = self.download.get("archive_name", "mvtec_anomaly_detection.tar.xz")
        return (
            f"To get MVTec AD by hand: download {archive} from {MVTEC_URL} (or "
            f"{self.download.get('url', MVTEC_URL)}) on a machine with internet, then either "
            f"put the archive at {self.root / archive} (the next run verifies and extracts "
            f"it) or extract it anywhere and set data.root=<folder holding bottle/, cable/, "
            "...>. data.download.enabled=false turns the download off."
        )

    def download_off_error(self) -> FileNotFoundError:
        """A known MVTec AD category is missing and the download is off: say so, and how to
        turn it on (not "did you mean" the name that was given)."""
        where = (
            f"{self.root} does not exist"
            if not self.root.is_dir()
            else f"no folder {self.root / self.category}"
        )
        return FileNotFoundError(
            f"MVTec AD category '{self.category}' is not under {self.root} ({where}) "
            "and the download is off (data.download.enabled=false). Set "
            "data.download.enabled=true to download MVTec AD (4.9 GB) into "
            f"{self.root}, or set data.root=<a folder that holds {self.category}/>."
        )

    def prepare_data(self) -> None:
        """Download MVTec AD if a known category is missing (local rank 0, under a file lock)."""
        missing = not (self.root / self.category).is_dir() and self.category in MVTEC_CATEGORIES
        if missing and not self.download.get("enabled", False):
            raise self.download_off_error()
        if missing:
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
        warn_if_incomplete(self.root / self.category, samples)
        train = samples["train"]
        train_idx, val_idx = split_train_val(len(train), self.val_fraction, self.split_seed)
        if self.val_fraction > 0 and not val_idx:
            rank_zero_warn(
                f"only {len(train)} training image(s) in {self.root / self.category}; "
                "no validation split (all stay in training)."
            )
        return [train[i] for i in train_idx], [train[i] for i in val_idx], samples["test"]
