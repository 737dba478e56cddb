"""Tests for data/folder.py: users' own folders, masks by stem, splits, and the train command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cfa_lightning.data import FolderDataModule
from cfa_lightning.data.folder import pil_extensions

ROOT = Path(__file__).resolve().parents[1]
SIZE = 40  # px, square images written by the helpers


def _image(path: Path, value: int = 120, size=(SIZE, SIZE), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    pixels = rng.integers(value - 20, value + 20, (size[1], size[0], 3)).astype(np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def _mask(path: Path, size=(SIZE, SIZE)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[5:15, 5:15] = 255
    Image.fromarray(mask).save(path)
    return path


@pytest.fixture
def product(tmp_path) -> Path:
    """good/ (10 images, mixed formats), scratch/ + dent/ (2 each), masks/ by stem."""
    root = tmp_path / "product"
    for i in range(10):
        _image(root / "good" / f"{i:02d}.{['png', 'jpg', 'bmp', 'tif', 'webp'][i % 5]}", 100 + i)
    for folder in ("scratch", "dent"):
        for i in range(2):
            _image(root / folder / f"{folder}_{i}.png", 200)
    _mask(root / "masks" / "scratch_0.png")
    _mask(root / "masks" / "scratch_1_mask.png")  # both naming styles match by stem
    _mask(root / "masks" / "dent_0.bmp")
    _mask(root / "masks" / "dent_1.png")
    return root


def _dm(root, **kwargs) -> FolderDataModule:
    kwargs = {"normal_dir": "good", "image_size": 32, "batch_size": 4, **kwargs}
    dm = FolderDataModule(str(root), **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_pil_extensions_cover_common_formats():
    assert {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"} <= set(
        pil_extensions()
    )


def test_full_layout_masks_by_stem_and_splits(product):
    dm = _dm(product, abnormal_dirs=["scratch", "dent"], mask_dir="masks", val_fraction=0.2)
    assert dm.has_masks
    test = dm.test_set.samples
    abnormal = [s for s in test if s.label == 1]
    assert len(abnormal) == 4 and {s.defect_type for s in abnormal} == {"scratch", "dent"}
    assert {s.path.stem: s.mask_path.name for s in abnormal} == {
        "scratch_0": "scratch_0.png", "scratch_1": "scratch_1_mask.png",
        "dent_0": "dent_0.bmp", "dent_1": "dent_1.png",
    }  # fmt: skip
    normal_test = [s.path for s in test if s.label == 0]
    train, val = [s.path for s in dm.train_set.samples], [s.path for s in dm.val_set.samples]
    assert (len(train), len(val), len(normal_test)) == (6, 2, 2)  # 20% test, then 20% val
    assert not (set(train) & set(val)) and not (set(train) | set(val)) & set(normal_test)
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape[1:] == (3, 32, 32) and batch["mask"].shape[1:] == (1, 32, 32)
    again = _dm(product, abnormal_dirs=["scratch", "dent"], mask_dir="masks", val_fraction=0.2)
    assert [s.path for s in again.val_set.samples] == val  # seeded


def test_without_masks_no_pixel_metrics(product):
    dm = _dm(product, abnormal_dirs="scratch")
    assert not dm.has_masks and all(s.mask_path is None for s in dm.test_set.samples)
    assert next(iter(dm.test_dataloader()))["mask"].sum() == 0  # the batch still has a mask key


def test_without_abnormal_images_says_auroc_cannot_be_computed(product):
    with pytest.warns(UserWarning, match="no abnormal images.*AUROC and F1 cannot be computed"):
        dm = _dm(product)
    assert {s.label for s in dm.test_set.samples} == {0} and len(dm.test_set) == 2
    assert not dm.has_masks


def test_normal_test_dir_and_val_dir(product, tmp_path):
    for i in range(3):
        _image(product / "holdout" / f"h{i}.png", 110)
        _image(product / "val" / f"v{i}.png", 115)
    dm = _dm(product, abnormal_dirs="scratch", normal_test_dir="holdout", val_dir="val")
    assert len(dm.train_set) == 10  # all of good/ trains: test and val come from their folders
    assert {s.path.parent.name for s in dm.val_set.samples} == {"val"}
    assert sum(s.label == 0 for s in dm.test_set.samples) == 3

    # A validation folder with good/ and defect subfolders gives image-level val labels.
    _image(product / "val2" / "good" / "a.png", 100)
    _image(product / "val2" / "crack" / "b.png", 220)
    dm = _dm(product, abnormal_dirs="scratch", val_dir="val2")
    assert sorted((s.label, s.defect_type) for s in dm.val_set.samples) == [
        (0, "good"), (1, "crack")
    ]  # fmt: skip


def test_a_val_dir_image_that_is_also_a_test_image_stops_the_run(product):
    _image(product / "val" / "fine.png", 130)
    # a copy of a test image under another name is found by its bytes
    (product / "val" / "copy.png").write_bytes((product / "scratch" / "scratch_1.png").read_bytes())
    with pytest.raises(ValueError, match=r"data.val_dir: .*copy.png is also a test image"):
        _dm(product, abnormal_dirs="scratch", val_dir="val")
    (product / "val" / "copy.png").unlink()
    _dm(product, abnormal_dirs="scratch", val_dir="val")
    with pytest.raises(ValueError, match=r"scratch_0.png is also a test image"):
        _dm(product, abnormal_dirs="scratch", val_dir="scratch")  # the test folder itself


def test_missing_mask_and_orphan_mask(product):
    (product / "masks" / "dent_1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 abnormal image\(s\) have no mask") as info:
        _dm(product, abnormal_dirs=["scratch", "dent"], mask_dir="masks")
    assert "dent_1.png" in str(info.value) and "data.mask_dir=null" in str(info.value)
    _mask(product / "masks" / "stray.png")
    with pytest.warns(UserWarning, match=r"2 mask\(s\) match no abnormal image.*stray.png"):
        _dm(product, abnormal_dirs="scratch", mask_dir="masks")


def test_misspelled_or_empty_folders(product, tmp_path):
    with pytest.raises(FileNotFoundError, match="data.normal_dir.*Did you mean: good"):
        _dm(product, normal_dir="godo")
    with pytest.raises(FileNotFoundError, match="data.abnormal_dirs.*Did you mean: scratch"):
        _dm(product, abnormal_dirs="scrach")
    with pytest.raises(FileNotFoundError, match="data.root"):
        _dm(tmp_path / "nowhere")
    (product / "empty").mkdir()
    (product / "empty" / "readme.txt").write_text("x")
    with (
        pytest.warns(UserWarning, match="ignored 1 file"),
        pytest.raises(FileNotFoundError, match="data.normal_dir: folder .*empty holds no images"),
    ):
        _dm(product, normal_dir="empty")
    with pytest.raises(FileNotFoundError, match="test set is empty"):
        _dm(product, test_fraction=0.0)


def test_spaces_non_ascii_and_symlinked_folders(tmp_path):
    real = tmp_path / "real"
    for i in range(4):
        _image(real / "gut ä" / f"Bild {i} ü.png", 100 + i)
    _image(real / "Kratzer" / "naïve 1.png", 210)
    _mask(real / "Masken" / "naïve 1_mask.png")
    link_root = tmp_path / "linked"
    link_root.mkdir()
    (link_root / "normal").symlink_to(real / "gut ä", target_is_directory=True)
    (link_root / "bad").symlink_to(real / "Kratzer", target_is_directory=True)
    dm = _dm(link_root, normal_dir="normal", abnormal_dirs="bad", mask_dir=str(real / "Masken"))
    item = dm.test_set[len(dm.test_set) - 1]
    assert item["label"].item() == 1 and item["mask"].sum() > 0
    assert item["image_path"].endswith("naïve 1.png")


def test_train_command_on_a_folder_without_masks(tmp_path):
    """`data=folder` end to end, validated (4 of the 8 non-test images validate): image metrics
    present, pixel metrics skipped with one line."""
    from cfa_lightning.data.synthetic import generate_synthetic_dataset

    source = generate_synthetic_dataset(
        tmp_path / "gen", n_train=10, n_test_good=0, n_test_defect=3, image_size=(64, 64)
    )
    root = tmp_path / "product"
    root.mkdir()
    (root / "ok").symlink_to(source / "train/good", target_is_directory=True)
    (root / "spots").symlink_to(source / "test/spot", target_is_directory=True)
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "cfa_lightning.train", "+experiment=demo", "data=folder",
         f"data.root={root}", "data.normal_dir=ok", "data.abnormal_dirs=[spots]",
         "data.image_size=64", "data.num_workers=0", "trainer.max_epochs=1",
         "data.val_fraction=0.5", "logger=none", "callbacks=selection", f"hydra.run.dir={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "WANDB_MODE": "offline"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert "test/image_AUROC" in metrics and not any("pixel" in k for k in metrics)
    log = proc.stdout + proc.stderr
    assert log.count("pixel metrics skipped") == 1
