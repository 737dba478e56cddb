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
                                                   "scratch", "spot", "crack")}  # fmt: skip
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


def _val_dir_product(synthetic_root: Path, tmp_path: Path, n_good: int) -> Path:
    """A copy of the synthetic category with a data.val_dir of ``n_good`` normal images (moved
    out of training) and real defects in crack/ (a defect type the test set does not use)."""
    import shutil

    category = tmp_path / "synthetic"
    shutil.copytree(synthetic_root / "synthetic", category)
    (category / "val" / "crack").mkdir(parents=True)
    (category / "val" / "good").mkdir()
    for i in range(3):
        shutil.copy(category / "test" / "scratch" / f"{i:03d}.png", category / "val" / "crack")
    for i in range(n_good):
        shutil.move(category / "train" / "good" / f"{i:03d}.png", category / "val" / "good")
    return category


def _folder_dm(category: Path, **kwargs) -> FolderDataModule:
    options = dict(normal_dir="train/good", abnormal_dirs=["test/spot"],
                   mask_dir="ground_truth/spot", normal_test_dir="test/good", val_dir="val",
                   image_size=SIZE, eval_batch_size=4, val_anomalies="synthetic",
                   synthetic_anomalies={"per_image": 1})  # fmt: skip
    dm = FolderDataModule(str(category), **{**options, **kwargs})
    dm.setup("fit")
    return dm


def test_real_val_dir_defects_reach_the_validation_metrics_and_the_thresholds(
    synthetic_root, tmp_path, caplog
):
    import pytorch_lightning as pl

    from cfa_lightning.metrics import AnomalyMetrics
    from tiny_models import tiny_module

    with caplog.at_level("INFO"):
        dm = _folder_dm(_val_dir_product(synthetic_root, tmp_path, n_good=4))
    val = dm.val_set
    assert (val.n_normal, val.n_synthetic, val.n_real) == (4, 4, 3)
    real = [val[i] for i in range(len(val)) if int(val[i]["label"]) and not val[i]["synthetic"]]
    assert len(real) == 3 and all("crack" in str(it["image_path"]) for it in real)
    assert "validation: 4 normal images, 4 with synthetic defects, 3 real anomalies" in caplog.text

    seen = {"anomalous": 0, "pixel_rows": 0}
    update = AnomalyMetrics.update

    def counting(self, scores, labels, maps=None, masks=None, pixel_rows=None):
        seen["anomalous"] += int(labels.sum())
        seen["pixel_rows"] += int(pixel_rows.sum()) if pixel_rows is not None else len(labels)
        return update(self, scores, labels, maps, masks, pixel_rows=pixel_rows)

    pl.seed_everything(0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AnomalyMetrics, "update", counting)  # torchmetrics wraps it at __init__
        module = tiny_module(input_size=list(SIZE), threshold_rule="auto")
    module.build_bank(dm.bank_dataloader())
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    trainer.validate(module, datamodule=dm, verbose=False)
    assert seen["anomalous"] == 4 + 3  # synthetic and real defects
    assert seen["pixel_rows"] == 4 + 4  # a real defect has no mask: image metrics only
    # real anomalies present: auto takes the best-F1 thresholds, not the normal quantile
    logged = trainer.callback_metrics
    cal = module.model.calibration
    assert float(cal.image_threshold) == pytest.approx(float(logged["val/image_F1_threshold"]))
    assert float(cal.pixel_threshold) == pytest.approx(float(logged["val/pixel_F1_threshold"]))


def test_a_val_dir_without_normal_images_says_how_many_it_needs(synthetic_root, tmp_path):
    import shutil

    category = _val_dir_product(synthetic_root, tmp_path, n_good=0)
    shutil.rmtree(category / "val" / "good")
    with pytest.raises(ValueError, match=r"data.val_dir=val holds 3 defective image\(s\) and no "
                                         r"normal one.*at least 4 normal image"):  # fmt: skip
        _folder_dm(category)
    with pytest.raises(ValueError, match=r"data.val_dir=val .*at least 1 normal image"):
        _folder_dm(category, val_anomalies="none")


def test_a_val_dir_with_too_few_normal_images_names_it(synthetic_root, tmp_path):
    category = _val_dir_product(synthetic_root, tmp_path, n_good=2)
    with pytest.raises(ValueError, match=r"data.val_dir=val holds 2: put at least 4 normal"):
        _folder_dm(category)


@pytest.mark.parametrize("data", ["mvtec", "folder", "synthetic", "shared"])
def test_every_data_config_validates_on_the_one_set_of_defaults(data):
    """conf/validation/synthetic.yaml is the one home of the synthetic anomalies' defaults: each
    data config composes it, and the Python side reads the same file."""
    from hydra import compose, initialize_config_dir

    from cfa_lightning.config import CONFIG_DIR, register_resolvers
    from cfa_lightning.data.val_anomalies import SyntheticAnomalyConfig

    register_resolvers()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        composed = compose("train", overrides=[f"data={data}"]).data.synthetic_anomalies
    defaults = SyntheticAnomalyConfig.from_mapping(None)
    assert vars(SyntheticAnomalyConfig.from_mapping(composed)) == vars(defaults)
    assert "crack" in defaults.families and defaults.per_image == 3
