"""Tests for data/val_anomalies.py and the validation split of data/base.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cfa_lightning.data import FolderDataModule, MVTecDataModule

SIZE = (64, 80)


def _dm(root: Path, **kwargs) -> MVTecDataModule:
    options = dict(image_size=SIZE, eval_batch_size=4, val_fraction=0.4, val_anomalies="synthetic")
    dm = MVTecDataModule(str(root), "synthetic", **{**options, **kwargs})
    dm.setup("fit")
    return dm


def test_validation_holds_normal_images_and_synthetic_defects(synthetic_root):
    dm = _dm(synthetic_root, synthetic_anomalies={"per_image": 3})
    val = dm.val_set
    n = val.n_normal
    assert n == 5 and len(val) == n * 4  # 40% of 12 training images, each + 3 defects
    items = [val[i] for i in range(len(val))]
    assert all(int(it["label"]) == 0 and not it["synthetic"] for it in items[:n])
    assert all(int(it["label"]) == 1 and it["synthetic"] for it in items[n:])
    assert all(it["mask"].sum() == 0 for it in items[:n])
    for item in items[n:]:  # exact masks at the model's resolution
        assert item["image"].shape == (3, *SIZE) and item["mask"].shape == (1, *SIZE)
        assert item["mask"].sum() > 0
    families = {it["defect_type"] for it in items[n:]}
    assert families == {f"synthetic_{f}" for f in ("cutpaste", "cutpaste_scar", "perlin",
                                                   "scratch", "spot")}  # fmt: skip
    # each defect changed exactly its mask's pixels of its normal image
    for j, item in enumerate(items[n:]):
        source = items[j // 3]["image"]
        changed = (item["image"] != source).any(dim=0)
        assert torch.equal(changed, item["mask"][0].bool())
    loader = dm.val_dataloader()
    batch = next(iter(loader))
    assert set(batch) >= {"image", "mask", "label", "synthetic"}


def test_defects_are_drawn_from_their_own_seed(synthetic_root):
    a, b = _dm(synthetic_root), _dm(synthetic_root)
    assert all(
        torch.equal(a.val_set[i]["image"], b.val_set[i]["image"]) for i in range(len(a.val_set))
    )
    c = _dm(synthetic_root, synthetic_anomalies={"seed": 1})
    assert not torch.equal(
        a.val_set[len(a.val_set) - 1]["image"], c.val_set[len(c.val_set) - 1]["image"]
    )


def test_no_test_image_reaches_validation(synthetic_root):
    dm = _dm(synthetic_root)
    train_dir = synthetic_root / "synthetic" / "train" / "good"
    val_files = {
        Path(str(dm.val_set[i]["image_path"]).split("#")[0]) for i in range(len(dm.val_set))
    }
    test_files = {s.path for s in dm.test_set.samples}
    assert val_files and all(p.parent == train_dir for p in val_files)
    assert not val_files & test_files
    assert not val_files & {s.path for s in dm.train_set.samples}  # held out of training too


def test_split_does_not_follow_the_training_seed(synthetic_root):
    # data.split_seed is fixed (0) in the configs; the training seed does not enter the split
    a = _dm(synthetic_root, val_anomalies="none")
    b = _dm(synthetic_root, val_anomalies="none", split_seed=0)
    assert [s.path for s in a.val_set.samples] == [s.path for s in b.val_set.samples]


def test_too_few_validation_images_names_the_options(synthetic_root):
    with pytest.raises(ValueError, match=r"at least 4 normal validation images.*data.val_fraction"):
        _dm(synthetic_root, val_fraction=0.1)
    # 12 training images: 0.3 is the smallest fraction that holds out 4 (0.29 holds out 3)
    with pytest.raises(ValueError, match=r"set data.val_fraction=0.3 or more"):
        _dm(synthetic_root, val_fraction=0.2)
    assert _dm(synthetic_root, val_fraction=0.3).val_set.n_normal == 4
    with pytest.raises(ValueError, match=r"found 0.*data.val_anomalies=none"):
        _dm(synthetic_root, val_fraction=0.0)


def test_unknown_family_or_option_is_refused(synthetic_root):
    with pytest.raises(ValueError, match="known families: cutpaste"):
        _dm(synthetic_root, synthetic_anomalies={"families": ["dent"]})
    with pytest.raises(ValueError, match="unknown option.*per_imag"):
        _dm(synthetic_root, synthetic_anomalies={"per_imag": 2})
    with pytest.raises(ValueError, match="none, synthetic"):
        _dm(synthetic_root, val_anomalies="cutpaste")


def test_folder_val_dir_gets_synthetic_defects(synthetic_root):
    category = synthetic_root / "synthetic"
    dm = FolderDataModule(str(category), normal_dir="train/good", abnormal_dirs=["test/spot"],
                          mask_dir="ground_truth/spot", normal_test_dir="test/good",
                          val_dir="train/good", image_size=SIZE, val_anomalies="synthetic",
                          synthetic_anomalies={"per_image": 1})  # fmt: skip
    dm.setup("fit")
    assert dm.val_set.n_normal == 12 and len(dm.val_set) == 24
