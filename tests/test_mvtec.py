"""Tests for data/mvtec.py: folder scan, its error messages, dataset items and datamodule."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cfa_lightning.data import AnomalyDataset, MVTecDataModule, scan_mvtec_category
from cfa_lightning.data.layout import MVTEC_CATEGORIES, MVTEC_COUNTS, MVTEC_URL, count_samples
from cfa_lightning.data.synthetic import generate_synthetic_dataset
from cfa_lightning.images import MIN_IMAGE_SIDE

SIZE = (48, 64)  # (H, W), non-square on purpose
N_TRAIN, N_GOOD, N_DEFECT = 10, 3, 2  # N_DEFECT per defect type (scratch, spot)
REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mvtec")
    generate_synthetic_dataset(
        root, "synthetic", n_train=N_TRAIN, n_test_good=N_GOOD, n_test_defect=N_DEFECT,
        image_size=SIZE, seed=0,
    )  # fmt: skip
    return root


@pytest.fixture
def copy_root(synthetic_root, tmp_path) -> Path:
    """A private copy that a test may break."""
    shutil.copytree(synthetic_root / "synthetic", tmp_path / "synthetic")
    return tmp_path


def _dm(root, **kwargs) -> MVTecDataModule:
    kwargs = {"image_size": SIZE, "batch_size": 4, "val_fraction": 0.2, **kwargs}
    dm = MVTecDataModule(str(root), "synthetic", **kwargs)
    dm.setup("fit")
    return dm


# ---------------------------------------------------------------------------- scan


def test_scan_counts_labels_masks_and_order(synthetic_root):
    samples = scan_mvtec_category(synthetic_root, "synthetic")
    train, test = samples["train"], samples["test"]
    assert len(train) == N_TRAIN and all(s.label == 0 and s.mask_path is None for s in train)
    assert [s.path.name for s in train] == sorted(s.path.name for s in train)
    assert len(test) == N_GOOD + 2 * N_DEFECT
    good = [s for s in test if s.defect_type == "good"]
    bad = [s for s in test if s.defect_type != "good"]
    assert len(good) == N_GOOD and all(s.label == 0 and s.mask_path is None for s in good)
    assert {s.defect_type for s in bad} == {"scratch", "spot"}
    for s in bad:
        assert s.label == 1
        assert s.mask_path == synthetic_root / f"synthetic/ground_truth/{s.defect_type}" / (
            f"{s.path.stem}_mask.png"
        )
    assert scan_mvtec_category(synthetic_root, "synthetic") == samples  # deterministic


def test_extensions_case_insensitive_and_non_images_ignored(copy_root):
    train_dir = copy_root / "synthetic/train/good"
    (train_dir / "000.png").rename(train_dir / "AAA.PNG")
    (train_dir / "notes.txt").write_text("x")
    (train_dir / ".hidden.png").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"ignored 1 file\(s\) .*notes.txt"):
        names = [s.path.name for s in scan_mvtec_category(copy_root, "synthetic")["train"]]
    assert names[-1] == "AAA.PNG" and len(names) == N_TRAIN


def test_misspelled_category_suggests_close_names(synthetic_root):
    with pytest.raises(FileNotFoundError) as info:
        scan_mvtec_category(synthetic_root, "synthetc")
    message = str(info.value)
    assert "Did you mean: synthetic" in message and "data.root=" in message

    with pytest.raises(FileNotFoundError) as info:
        scan_mvtec_category(synthetic_root, "botle")
    message = str(info.value)
    assert "Did you mean: bottle" in message
    assert MVTEC_URL in message and str(synthetic_root) in message
    assert len(MVTEC_CATEGORIES) == 15


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root") as info:
        scan_mvtec_category(tmp_path / "nowhere", "bottle")
    assert "nowhere" in str(info.value) and MVTEC_URL in str(info.value)


def test_empty_train_good(copy_root):
    for path in (copy_root / "synthetic/train/good").iterdir():
        path.unlink()
    with pytest.raises(FileNotFoundError, match=r"train/good holds no images"):
        scan_mvtec_category(copy_root, "synthetic")
    shutil.rmtree(copy_root / "synthetic/train")
    with pytest.raises(FileNotFoundError, match=r"no training folder .*train/good"):
        scan_mvtec_category(copy_root, "synthetic")


def test_test_folder_without_images(copy_root):
    shutil.rmtree(copy_root / "synthetic/test")
    (copy_root / "synthetic/test/good").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="test folder .* holds no images"):
        scan_mvtec_category(copy_root, "synthetic")


def test_defect_without_mask_names_expected_path(copy_root):
    missing = copy_root / "synthetic/ground_truth/spot/001_mask.png"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match="no ground-truth mask") as info:
        scan_mvtec_category(copy_root, "synthetic")
    assert str(missing) in str(info.value)


def test_mask_size_mismatch_is_checked_lazily(copy_root):
    mask_path = copy_root / "synthetic/ground_truth/scratch/000_mask.png"
    Image.new("L", (SIZE[1] + 1, SIZE[0]), 0).save(mask_path)
    samples = scan_mvtec_category(copy_root, "synthetic")["test"]  # scan does not open images
    index = next(i for i, s in enumerate(samples) if s.mask_path == mask_path)
    dataset = AnomalyDataset(samples)
    with pytest.raises(ValueError, match="must match") as info:
        dataset[index]
    assert str(mask_path) in str(info.value) and "test/scratch/000.png" in str(info.value)


def test_corrupt_image_error_names_the_file(copy_root):
    bad = copy_root / "synthetic/train/good/003.png"
    bad.write_bytes(bad.read_bytes()[:60])
    dataset = AnomalyDataset(scan_mvtec_category(copy_root, "synthetic")["train"])
    with pytest.raises(ValueError, match="003.png"):
        dataset[3]


# ---------------------------------------------------------------------------- dataset


def test_dataset_items(synthetic_root):
    samples = scan_mvtec_category(synthetic_root, "synthetic")["test"]
    dataset = AnomalyDataset(samples)  # default transform: 256 x 256
    good = dataset[0]
    assert set(good) == {"image", "mask", "label", "image_path", "defect_type"}
    assert good["image"].shape == (3, 256, 256) and good["image"].dtype == torch.float32
    assert good["mask"].shape == (1, 256, 256) and good["mask"].sum() == 0
    assert good["label"].dtype == torch.int64 and good["label"].item() == 0
    assert good["defect_type"] == "good" and good["image_path"] == str(samples[0].path)
    defect = dataset[len(dataset) - 1]
    assert defect["label"].item() == 1 and defect["defect_type"] in ("scratch", "spot")
    assert set(defect["mask"].unique().tolist()) == {0.0, 1.0}


# ---------------------------------------------------------------------------- datamodule


def test_val_split_exact_disjoint_deterministic_and_never_from_test(synthetic_root):
    dm = _dm(synthetic_root, split_seed=0)
    train = [s.path for s in dm.train_set.samples]
    val = [s.path for s in dm.val_set.samples]
    assert (len(train), len(val)) == (N_TRAIN - 2, 2)  # round(0.2 * 10)
    assert not set(train) & set(val)
    all_train = {s.path for s in scan_mvtec_category(synthetic_root, "synthetic")["train"]}
    assert set(train) | set(val) == all_train
    assert all("/train/good/" in p.as_posix() for p in val)
    assert len(dm.test_set) == N_GOOD + 2 * N_DEFECT

    again = _dm(synthetic_root, split_seed=0)
    assert [s.path for s in again.val_set.samples] == val
    other_splits = {tuple(s.path for s in _dm(synthetic_root, split_seed=k).val_set.samples)
                    for k in range(1, 4)}  # fmt: skip
    assert other_splits - {tuple(val)}  # the seed matters


def test_val_fraction_zero_and_bounds(synthetic_root):
    dm = _dm(synthetic_root, val_fraction=0.0)
    assert dm.val_set is None and dm.val_dataloader() == []
    assert len(dm.train_set) == N_TRAIN
    dm = _dm(synthetic_root, val_fraction=0.99)
    assert (len(dm.train_set), len(dm.val_set)) == (1, N_TRAIN - 1)  # one stays in train
    with pytest.raises(ValueError, match="val_fraction"):
        MVTecDataModule(str(synthetic_root), "synthetic", val_fraction=1.0)


def test_dataloaders_batch_shapes_and_order(synthetic_root):
    dm = _dm(synthetic_root, batch_size=3, eval_batch_size=5, crop_size=(32, 40))
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (3, 3, 32, 40) and batch["mask"].shape == (3, 1, 32, 40)
    assert batch["label"].shape == (3,) and batch["label"].dtype == torch.int64
    assert len(batch["image_path"]) == 3
    assert sum(len(b["label"]) for b in dm.train_dataloader()) == N_TRAIN - 2  # no drop_last

    bank = [p for b in dm.bank_dataloader() for p in b["image_path"]]
    assert bank == [str(s.path) for s in dm.train_set.samples]  # same images, fixed order
    assert dm.bank_dataloader().batch_size == 5
    assert next(iter(dm.val_dataloader()))["image"].shape == (2, 3, 32, 40)

    test_batches = list(dm.test_dataloader())
    assert test_batches[0]["image"].shape == (5, 3, 32, 40)
    labels = torch.cat([b["label"] for b in test_batches])
    assert labels.tolist() == [0] * N_GOOD + [1] * (2 * N_DEFECT)  # not shuffled
    assert MVTecDataModule(str(synthetic_root), "synthetic").eval_batch_size == 4


def test_relative_root_resolved_at_construction(synthetic_root, monkeypatch):
    monkeypatch.chdir(synthetic_root.parent)
    dm = MVTecDataModule(synthetic_root.name, "synthetic")
    assert dm.root == synthetic_root and dm.root.is_absolute()
    assert dm.hparams.category == "synthetic" and dm.hparams.root == synthetic_root.name
    monkeypatch.chdir("/")
    dm.prepare_data()
    dm.setup("test")
    assert len(dm.test_set) == N_GOOD + 2 * N_DEFECT


def test_relative_root_uses_launch_dir_under_hydra(synthetic_root, monkeypatch):
    from hydra import compose, initialize
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.chdir(synthetic_root.parent)  # the launch directory (hydra.runtime.cwd)
    with initialize(version_base=None, config_path=None):
        HydraConfig.instance().set_config(compose(return_hydra_config=True))
        try:
            monkeypatch.chdir("/")  # Hydra's run dir
            dm = MVTecDataModule(synthetic_root.name, "synthetic")
        finally:
            HydraConfig.instance().cfg = None
    assert not HydraConfig.initialized()
    assert dm.root == synthetic_root


def test_prepare_data_checks_presence(tmp_path):
    (tmp_path / "bottle").mkdir()
    with pytest.raises(FileNotFoundError, match="Did you mean: bottle"):
        MVTecDataModule(str(tmp_path), "bottel").prepare_data()


# ---------------------------------------------------------------------------- real data


@pytest.mark.real_data
def test_real_data_counts_and_one_item():
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data not found at {REAL_DATA}")

    def counts(samples):
        out: dict[str, int] = {}
        for s in samples:
            out[s.defect_type] = out.get(s.defect_type, 0) + 1
        return out

    cookies = scan_mvtec_category(REAL_DATA, "cookies")
    assert len(cookies["train"]) == 21
    assert counts(cookies["test"]) == {"good": 10, "anomaly": 32}

    tiles = scan_mvtec_category(REAL_DATA, "magnetic_tile")
    assert len(tiles["train"]) == 761
    assert counts(tiles["test"]) == {
        "good": 191, "blowhole": 115, "break": 85, "crack": 57, "fray": 32, "uneven": 103,
    }  # fmt: skip

    item = AnomalyDataset(tiles["test"])[-1]  # an `uneven` image (grayscale, odd size)
    assert item["image"].shape == (3, 256, 256) and item["mask"].shape == (1, 256, 256)
    assert item["label"].item() == 1 and item["defect_type"] == "uneven"
    assert np.isfinite(item["image"].numpy()).all()


# ---------------------------------------------------------------------------- counts table


def test_counts_table_matches_the_paper_totals():
    assert tuple(MVTEC_COUNTS) == MVTEC_CATEGORIES
    assert sum(c.train for c in MVTEC_COUNTS.values()) == 3629
    assert sum(c.test_good for c in MVTEC_COUNTS.values()) == 467
    assert sum(c.test_defect for c in MVTEC_COUNTS.values()) == 1258
    assert sum(c.defect_types for c in MVTEC_COUNTS.values()) == 73
    assert {k for k, c in MVTEC_COUNTS.items() if c.grayscale} == {"grid", "screw", "zipper"}


def _fake_complete_copy(root: Path, category: str) -> None:
    """Every file a complete copy of ``category`` holds, as tiny 32 x 32 PNGs."""
    counts = MVTEC_COUNTS[category]
    buffer = io.BytesIO()
    Image.new("L" if counts.grayscale else "RGB", (32, 32), 128).save(buffer, format="PNG")
    blob = buffer.getvalue()
    buffer = io.BytesIO()
    mask = np.zeros((32, 32), np.uint8)
    mask[4:9, 4:9] = 255
    Image.fromarray(mask).save(buffer, format="PNG")
    mask_blob = buffer.getvalue()
    base = root / category
    folders = [base / "train/good", base / "test/good"]
    defects = [f"defect_{k}" for k in range(counts.defect_types)]
    for folder in folders + [base / "test" / d for d in defects]:
        folder.mkdir(parents=True)
    for folder in base / "ground_truth", *(base / "ground_truth" / d for d in defects):
        folder.mkdir(exist_ok=True)
    for i in range(counts.train):
        (folders[0] / f"{i:03d}.png").write_bytes(blob)
    for i in range(counts.test_good):
        (folders[1] / f"{i:03d}.png").write_bytes(blob)
    for i in range(counts.test_defect):  # round robin over the defect types
        defect = defects[i % len(defects)]
        (base / "test" / defect / f"{i:03d}.png").write_bytes(blob)
        (base / "ground_truth" / defect / f"{i:03d}_mask.png").write_bytes(mask_blob)


def test_scan_of_a_complete_copy_matches_the_table(tmp_path, recwarn):
    for category in MVTEC_CATEGORIES:
        _fake_complete_copy(tmp_path, category)
        samples = scan_mvtec_category(tmp_path, category)
        assert count_samples(samples) == MVTEC_COUNTS[category]._replace(grayscale=False), category
    # Grayscale categories load as 3-channel images; a complete copy raises no count warning.
    dm = MVTecDataModule(str(tmp_path), "zipper", image_size=32, val_fraction=0.0)
    dm.setup("fit")
    assert dm.train_set[0]["image"].shape == (3, 32, 32) and dm.has_masks
    assert not [w for w in recwarn if "incomplete copy" in str(w.message)]
    (tmp_path / "zipper/train/good/000.png").unlink()
    with pytest.warns(UserWarning, match="239 train.*complete MVTec AD 'zipper' has 240"):
        MVTecDataModule(str(tmp_path), "zipper", image_size=32).setup("fit")


# ---------------------------------------------------------------------------- bad inputs


def test_unknown_or_misspelled_category_is_never_downloaded(tmp_path):
    download = {"enabled": True, "url": "http://127.0.0.1:9/never", "sha256": None}
    with pytest.raises(FileNotFoundError, match="Did you mean: bottle"):
        MVTecDataModule(str(tmp_path), "botle", download=download).prepare_data()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MVTecDataModule(str(tmp_path / "x"), "bottle", download={}).prepare_data()


def test_a_missing_category_with_the_download_off_says_how_to_turn_it_on(tmp_path):
    (tmp_path / "tile").mkdir()
    off = {"enabled": False, "url": "http://127.0.0.1:9/never"}
    with pytest.raises(FileNotFoundError) as err:
        MVTecDataModule(str(tmp_path), "bottle", download=off).prepare_data()
    assert str(err.value) == (
        f"MVTec AD category 'bottle' is not under {tmp_path} (no folder {tmp_path / 'bottle'}) "
        "and the download is off (data.download.enabled=false). Set data.download.enabled=true "
        f"to download MVTec AD (4.9 GB) into {tmp_path}, or set data.root=<a folder that holds "
        "bottle/>."
    )
    with pytest.raises(FileNotFoundError, match="does not exist.*download is off"):
        MVTecDataModule(str(tmp_path / "x"), "bottle", download=off).prepare_data()
    with pytest.raises(FileNotFoundError) as err:  # the name given is never its own suggestion
        scan_mvtec_category(tmp_path, "bottle")
    assert "Did you mean: bottle" not in str(err.value)


def test_truncated_file_stops_at_setup_or_is_skipped_and_counted(copy_root):
    bad = copy_root / "synthetic/train/good/003.png"
    bad.write_bytes(bad.read_bytes()[:60])
    (copy_root / "synthetic/test/good/001.png").write_text("not an image")
    with pytest.raises(ValueError, match="2 bad image") as info:
        _dm(copy_root)
    assert "003.png" in str(info.value) and "001.png" in str(info.value)
    assert "data.skip_bad_images=true" in str(info.value)
    with pytest.warns(UserWarning, match=r"skipped 2 of \d+ image"):
        dm = _dm(copy_root, skip_bad_images=True)
    assert len(dm.train_set) + len(dm.val_set) == N_TRAIN - 1
    assert len(dm.test_set) == N_GOOD - 1 + 2 * N_DEFECT


def test_mask_size_mismatch_stops_at_setup(copy_root):
    mask_path = copy_root / "synthetic/ground_truth/spot/000_mask.png"
    Image.new("L", (SIZE[1], SIZE[0] + 3), 0).save(mask_path)
    with pytest.raises(ValueError, match="mask is 64x51 but its image 000.png is 64x48"):
        _dm(copy_root)
    with pytest.warns(UserWarning, match="skipped 1 of"):
        dm = _dm(copy_root, skip_bad_images=True)
    assert len(dm.test_set) == N_GOOD + 2 * N_DEFECT - 1


def test_very_small_images_are_refused_larger_ones_of_any_shape_work(copy_root):
    train_dir = copy_root / "synthetic/train/good"
    Image.new("RGB", (MIN_IMAGE_SIDE - 1, 200), (9, 9, 9)).save(train_dir / "tiny.png")
    with pytest.raises(ValueError, match=f"31x200 px, smaller than {MIN_IMAGE_SIDE} px"):
        _dm(copy_root)
    (train_dir / "tiny.png").unlink()
    Image.new("RGB", (MIN_IMAGE_SIDE, 500), (9, 9, 9)).save(train_dir / "narrow.png")
    Image.new("RGB", (900, 40), (9, 9, 9)).save(train_dir / "wide.png")
    dm = _dm(copy_root, val_fraction=0.0, batch_size=N_TRAIN + 2)
    assert next(iter(dm.bank_dataloader()))["image"].shape == (N_TRAIN + 2, 3, *SIZE)


def test_image_modes_mix_in_one_batch(copy_root):
    train_dir = copy_root / "synthetic/train/good"
    rgb = Image.open(train_dir / "000.png").convert("RGB")
    rgb.convert("L").save(train_dir / "gray.png")
    rgb.convert("RGBA").save(train_dir / "rgba.png")
    rgb.convert("P").save(train_dir / "palette.png")
    Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257).save(train_dir / "i16.png")
    rgb.convert("CMYK").save(train_dir / "cmyk.tif")
    dm = _dm(copy_root, val_fraction=0.0, batch_size=N_TRAIN + 5)
    batch = next(iter(dm.bank_dataloader()))
    assert batch["image"].shape == (N_TRAIN + 5, 3, *SIZE) and torch.isfinite(batch["image"]).all()


def test_soft_mask_values_are_binarised_with_a_warning(copy_root):
    mask_path = copy_root / "synthetic/ground_truth/scratch/000_mask.png"
    mask = np.asarray(Image.open(mask_path)).copy()
    mask[mask == 255] = 200  # e.g. anti-aliased or 0/1-scaled annotations
    mask[0, :3] = (1, 100, 128)
    Image.fromarray(mask).save(mask_path)
    with pytest.warns(UserWarning, match=r"1 mask\(s\) hold values other than 0 and 255"):
        dm = _dm(copy_root)
    index = next(i for i, s in enumerate(dm.test_set.samples) if s.mask_path == mask_path)
    item = dm.test_set[index]["mask"]
    assert set(item.unique().tolist()) == {0.0, 1.0}
    assert item[0, 0, :3].tolist() == [0.0, 0.0, 1.0]  # > 127 is a defect


def test_mask_without_image_is_reported(copy_root):
    Image.new("L", (SIZE[1], SIZE[0]), 0).save(
        copy_root / "synthetic/ground_truth/spot/077_mask.png"
    )
    with pytest.warns(UserWarning, match=r"1 mask\(s\) .* no test image .*077_mask.png"):
        scan_mvtec_category(copy_root, "synthetic")


def test_symlinked_folders_spaces_and_non_ascii_names(copy_root, tmp_path):
    category = copy_root / "synthetic"
    for path in (category / "test/spot").iterdir():
        path.rename(path.with_name(f"Fleck ü {path.name}"))
    for path in (category / "ground_truth/spot").iterdir():
        path.rename(path.with_name(f"Fleck ü {path.name}"))
    linked = tmp_path / "linked root"
    linked.mkdir()
    (linked / "synthetic").symlink_to(category, target_is_directory=True)
    moved = tmp_path / "elsewhere"
    (category / "train/good").rename(moved)
    (category / "train/good").symlink_to(moved, target_is_directory=True)
    dm = _dm(linked)
    assert len(dm.train_set) + len(dm.val_set) == N_TRAIN
    spots = [s for s in dm.test_set.samples if s.defect_type == "spot"]
    assert len(spots) == N_DEFECT and all(s.mask_path.name.startswith("Fleck ü ") for s in spots)
    assert next(iter(dm.test_dataloader()))["image"].shape[1:] == (3, *SIZE)


def test_cached_dataset_decodes_each_image_once(tmp_path):
    from cfa_lightning.data.transforms import ImageMaskTransform

    root = tmp_path / "d"
    generate_synthetic_dataset(root, n_train=3, n_test_good=1, n_test_defect=1, image_size=(40, 40))
    samples = scan_mvtec_category(root, "synthetic")["train"]
    cached = AnomalyDataset(samples, ImageMaskTransform(32), cache=True)
    first = cached[0]["image"].clone()
    samples[0].path.unlink()  # a second read from disk would now fail
    assert torch.equal(cached[0]["image"], first)
    with pytest.raises(FileNotFoundError):
        AnomalyDataset(samples, ImageMaskTransform(32))[0]


def _mixed_shapes(root: Path, shapes: list[tuple[int, int]]) -> Path:
    """An MVTec-layout category whose training images have the given (H, W) shapes."""
    generate_synthetic_dataset(root, "mixed", n_train=len(shapes), n_test_good=2, n_test_defect=1,
                               image_size=(48, 64), seed=0)  # fmt: skip
    good = sorted((root / "mixed" / "train" / "good").glob("*.png"))
    for path, (h, w) in zip(good, shapes, strict=True):
        Image.open(path).convert("RGB").resize((w, h)).save(path)
    return root


def test_auto_size_keeps_an_aspect_the_training_images_share(tmp_path, caplog):
    shapes = [(100, 250)] * 4 + [(120, 300)] * 4 + [(122, 300)]  # H / W 0.40-0.41
    root = _mixed_shapes(tmp_path, shapes)
    dm = MVTecDataModule(str(root), "mixed", image_size="auto", pixels=4096, val_fraction=0.0,
                         download={"enabled": False})  # fmt: skip
    with caplog.at_level("INFO", logger="cfa_lightning.data"):
        size = dm.choose_image_size(16, "resnet18")
    assert size == (48, 96)  # ideal 40.5 x 101.2 at 4096 px, sides rounded to 16
    assert "9 training images, their aspects agree" in caplog.text
    assert "model input 48x96" in caplog.text
    assert dm.auto_size["rule"] == "kept aspect" and dm.auto_size["image_size"] == [48, 96]
    assert dm.auto_size["images"] == 9 and dm.auto_size["median_aspect"] == 0.4
    assert dm.hparams["image_size"] == [48, 96]  # what the checkpoint stores
    dm.setup("fit")
    assert dm.train_set[0]["image"].shape == (3, 48, 96)
    assert dm.test_set[0]["mask"].shape == (1, 48, 96)


def test_auto_size_is_square_when_the_aspects_vary_and_says_why(tmp_path, caplog):
    root = _mixed_shapes(tmp_path, [(100, 250)] * 4 + [(300, 120)] * 3 + [(200, 200)] * 2)
    dm = MVTecDataModule(str(root), "mixed", image_size="auto", pixels=4096, val_fraction=0.0,
                         download={"enabled": False})  # fmt: skip
    with caplog.at_level("INFO", logger="cfa_lightning.data"):
        assert dm.choose_image_size(16) == (64, 64)
    assert "their aspects vary (H/W 0.4 to 2.5" in caplog.text and "input is square" in caplog.text
    assert dm.auto_size["rule"] == "square"


def test_auto_size_follows_the_exif_orientation(tmp_path):
    root = _mixed_shapes(tmp_path, [(64, 128)] * 4)  # stored landscape
    for path in (root / "mixed" / "train" / "good").glob("*.png"):
        image = Image.open(path).convert("RGB")
        exif = image.getexif()
        exif[0x0112] = 6  # shown turned by 90 degrees: portrait
        image.save(path, exif=exif)
    dm = MVTecDataModule(str(root), "mixed", image_size="auto", pixels=8192, val_fraction=0.0,
                         download={"enabled": False})  # fmt: skip
    assert dm.choose_image_size(16) == (128, 64)
    dm.setup("fit")
    assert dm.train_set[0]["image"].shape == (3, 128, 64)  # read upright, as measured


def test_auto_size_measures_only_the_readable_images(tmp_path):
    root = _mixed_shapes(tmp_path, [(64, 128)] * 5)
    (root / "mixed" / "train" / "good" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    dm = MVTecDataModule(str(root), "mixed", image_size="auto", pixels=8192, val_fraction=0.0,
                         skip_bad_images=True, download={"enabled": False})  # fmt: skip
    assert dm.choose_image_size(16) == (64, 128)
    assert dm.auto_size["images"] == 5


def test_extreme_aspect_warns_with_the_ratio_and_the_ways_out(tmp_path, caplog):
    root = _mixed_shapes(tmp_path, [(40, 360)] * 4)  # 9:1
    dm = MVTecDataModule(str(root), "mixed", image_size="auto", pixels=65536, val_fraction=0.0,
                         download={"enabled": False})  # fmt: skip
    with caplog.at_level("WARNING", logger="cfa_lightning.data"):
        dm.choose_image_size(16)
    assert "aspect ratio of 9.0:1" in caplog.text
    assert "data.image_size=[H, W]" in caplog.text and "tiles" in caplog.text


def test_auto_size_stops_on_a_budget_too_small_before_any_training(tmp_path):
    root = _mixed_shapes(tmp_path, [(64, 128)] * 4)
    dm = MVTecDataModule(str(root), "mixed", image_size="auto", pixels=100, val_fraction=0.0,
                         download={"enabled": False})  # fmt: skip
    with pytest.raises(ValueError, match=r"data\.pixels=100 is too small.*data\.pixels=2048"):
        dm.choose_image_size(32)


def test_auto_with_a_crop_resizes_to_the_square_of_the_budget(tmp_path):
    root = _mixed_shapes(tmp_path, [(64, 128)] * 4)
    dm = MVTecDataModule(str(root), "mixed", image_size="auto", crop_size=56, pixels=4096,
                         val_fraction=0.0, download={"enabled": False})  # fmt: skip
    assert dm.choose_image_size(16) == (64, 64) and dm.hparams["image_size"] == [64, 64]
    dm.setup("fit")
    assert dm.train_set[0]["image"].shape == (3, 56, 56)
